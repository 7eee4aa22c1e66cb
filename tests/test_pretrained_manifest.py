"""The shipped manifests hold the required backbones with the published facts; the schema rejects
unexplained nulls, stale reasons, duplicates and unknown names."""
import copy

import pytest
import yaml

from norm_plugins.pretrained import (ManifestError, UnknownPretrainedError, checkpoint_dir, get_entry,
                                     load_manifests, pretrained_home)
from norm_plugins.pretrained.conversion import LAYOUTS
from norm_plugins.pretrained.manifest import read_manifest


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv('NORM_PLUGINS_HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('NORM_PLUGINS_MANIFESTS', raising=False)
    return tmp_path / 'home'


# name -> (GPUs, images per GPU, norm type, depth, top-1 accuracy, key layout)
EXPECTED = {
    'resnet50_sn_8x32': (8, 32, 'SN', 50, 76.92, 'sn_resnet'),
    'resnet50_sn_8x4': (8, 4, 'SN', 50, 75.85, 'sn_resnet'),
    'resnet50_sn_8x2': (8, 2, 'SN', 50, 75.6, 'sn_resnet'),
    'resnet50_sn_8x1': (8, 1, 'SN', 50, 75.94, 'sn_resnet'),
    'resnet101_sn_8x32': (8, 32, 'SN', 101, 78.54, 'sn_resnet'),
    'resnet50_gn_ws': (None, 1, 'GN', 50, 76.28, 'gn_ws_resnet'),
    'resnet101_gn_ws': (None, 1, 'GN', 101, 77.9, 'gn_ws_resnet'),
    'resnet50_bcn_ws': (4, 64, 'BCN', 50, 76.91, 'bcn_ws_resnet'),
    'resnet101_bcn_ws': (4, 32, 'BCN', 101, 78.71, 'bcn_ws_resnet'),
}


def test_shipped_manifests_cover_the_required_backbones(isolated_home):
    entries = load_manifests()
    for name, (gpus, per_gpu, norm, depth, top1, layout) in EXPECTED.items():
        entry = entries[name]
        assert (entry.gpus, entry.images_per_gpu, entry.norm_cfg['type'], entry.architecture['depth']) == \
            (gpus, per_gpu, norm, depth), name
        assert entry.get('Results')[0]['Metrics']['Top 1 Accuracy'] == top1
        assert entry.key_layout == layout and layout in LAYOUTS
        assert entry.architecture['deep_stem'] is False
        assert entry.source_urls and all(u.startswith('https://') for u in entry.source_urls)


def test_layer_options_record_the_authors_formulas(isolated_home):
    assert get_entry('resnet50_sn_8x1').norm_cfg['normalizers'] == ['in', 'ln']
    assert get_entry('resnet50_sn_8x2').norm_cfg['normalizers'] == ['in', 'ln', 'bn']
    assert all(get_entry(n).norm_cfg['unbiased_instance_var'] for n in EXPECTED if '_sn_' in n)
    assert get_entry('resnet50_gn_ws').conv_cfg == {'type': 'WSConv', 'formula': 'convws'}
    assert get_entry('resnet50_gn_ws').source_sha256 == '15beedd8'
    assert get_entry('resnet101_gn_ws').source_sha256 == '3e3c308c'
    assert not get_entry('resnet50_sn_8x1').uses_batch_statistics
    assert not get_entry('resnet50_gn_ws').uses_batch_statistics
    assert get_entry('resnet50_sn_8x2').uses_batch_statistics and get_entry('resnet50_bcn_ws').uses_batch_statistics


def test_every_null_has_its_reason(isolated_home):
    entry = get_entry('resnet50_sn_8x2')
    assert entry.get('Results.0.Metrics.Top 5 Accuracy') is None
    assert 'top-1' in entry.unknown_reason('Results.0.Metrics.Top 5 Accuracy')
    assert entry.converted_sha256 is None and entry.unknown_reason('Converted.SHA256')


def test_cache_folder_follows_norm_plugins_home(isolated_home, monkeypatch, tmp_path):
    assert pretrained_home() == isolated_home
    assert checkpoint_dir() == isolated_home / 'checkpoints'
    monkeypatch.delenv('NORM_PLUGINS_HOME')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    assert checkpoint_dir() == tmp_path / 'cache' / 'norm_plugins' / 'checkpoints'


def test_unknown_name_lists_the_known_ones(isolated_home):
    with pytest.raises(UnknownPretrainedError, match=r"no pretrained backbone named 'resnet50_sn_8x3'.*resnet50_sn_8x2"):
        get_entry('norm_plugins://resnet50_sn_8x3')


def _write(path, models):
    path.write_text(yaml.safe_dump({'Models': models}, sort_keys=False))
    return path


def _shipped_raw(name='resnet50_sn_8x2'):
    return copy.deepcopy(get_entry(name).raw)


def test_null_without_reason_is_rejected(isolated_home, tmp_path):
    raw = _shipped_raw()
    del raw['Unknowns']['Source.SHA256']
    with pytest.raises(ManifestError, match=r"null field\(s\) \['Source.SHA256'\] need a reason"):
        read_manifest(_write(tmp_path / 'bad.yml', [raw]))


def test_stale_reason_is_rejected(isolated_home, tmp_path):
    raw = _shipped_raw()
    raw['Source']['SHA256'] = 'abcd1234'
    with pytest.raises(ManifestError, match=r"explains field\(s\) \['Source.SHA256'\] that are not null"):
        read_manifest(_write(tmp_path / 'bad.yml', [raw]))


def test_missing_field_is_rejected(isolated_home, tmp_path):
    raw = _shipped_raw()
    del raw['Metadata']['Images Per GPU']
    with pytest.raises(ManifestError, match=r"missing field\(s\) \['Metadata.Images Per GPU'\]"):
        read_manifest(_write(tmp_path / 'bad.yml', [raw]))


def test_duplicate_name_is_rejected(isolated_home, monkeypatch, tmp_path):
    extra = tmp_path / 'extra'
    extra.mkdir()
    _write(extra / 'dup.yml', [_shipped_raw()])
    monkeypatch.setenv('NORM_PLUGINS_MANIFESTS', str(extra))
    with pytest.raises(ManifestError, match="'resnet50_sn_8x2' is defined in both"):
        load_manifests()


def test_user_manifests_are_found(isolated_home):
    raw = _shipped_raw()
    raw['Name'] = 'my_resnet50_sn_8x16'
    raw['Metadata']['Images Per GPU'] = 16
    (isolated_home / 'manifests').mkdir(parents=True)
    _write(isolated_home / 'manifests' / 'local.yml', [raw])
    assert get_entry('my_resnet50_sn_8x16').images_per_gpu == 16
