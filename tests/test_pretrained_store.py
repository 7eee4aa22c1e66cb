"""The norm_plugins:// scheme: finds the converted file in $NORM_PLUGINS_HOME, checks its sha256,
loads plain state dicts only, and fails fast with the URLs, expected path and conversion command."""
import copy
import time

import pytest
import torch
import yaml
from mmengine.runner import CheckpointLoader

import norm_plugins  # noqa: F401  (registers the scheme)
from norm_plugins.pretrained import (ChecksumMismatchError, ConversionError, PretrainedFileMissingError,
                                     UnknownPretrainedError, file_sha256, get_entry, save_converted)
from norm_plugins.pretrained.store import load_from_norm_plugins


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv('NORM_PLUGINS_HOME', str(tmp_path / 'home'))
    monkeypatch.setenv('NORM_PLUGINS_MANIFESTS', str(tmp_path / 'manifests'))
    (tmp_path / 'manifests').mkdir()
    return tmp_path / 'home'


@pytest.fixture
def tiny_state():
    torch.manual_seed(0)
    return {'conv1.weight': torch.randn(4, 3, 7, 7), 'sn1.weight': torch.randn(4),
            'sn1.num_batches_tracked': torch.tensor(0)}


def _record_entry(tmp_path, name, sha256):
    raw = copy.deepcopy(get_entry('resnet50_sn_8x2').raw)
    raw['Name'] = name
    raw['Converted'] = {'File': f'{name}-{sha256[:8]}.pth', 'SHA256': sha256}
    for key in ('Converted.File', 'Converted.SHA256'):
        del raw['Unknowns'][key]
    (tmp_path / 'manifests' / f'{name}.yml').write_text(yaml.safe_dump({'Models': [raw]}, sort_keys=False))


def test_scheme_is_registered_with_mmengine():
    assert CheckpointLoader._get_checkpoint_loader('norm_plugins://resnet50_sn_8x2') is load_from_norm_plugins


def test_loads_a_converted_file_through_checkpoint_loader(home, tiny_state):
    path, sha256 = save_converted(tiny_state, 'resnet50_sn_8x2', home / 'checkpoints')
    assert path.name == f'resnet50_sn_8x2-{sha256[:8]}.pth' and file_sha256(path) == sha256
    loaded = CheckpointLoader.load_checkpoint('norm_plugins://resnet50_sn_8x2', map_location='cpu')
    assert loaded.keys() == tiny_state.keys()
    for key, value in tiny_state.items():
        assert torch.equal(loaded[key], value)


def test_recorded_hash_is_verified(home, tmp_path, tiny_state):
    path, sha256 = save_converted(tiny_state, 'my_sn', home / 'checkpoints')
    _record_entry(tmp_path, 'my_sn', sha256)
    assert torch.equal(load_from_norm_plugins('norm_plugins://my_sn')['sn1.weight'], tiny_state['sn1.weight'])
    tampered = dict(tiny_state, **{'sn1.weight': tiny_state['sn1.weight'] + 1})
    torch.save(tampered, path)
    actual = file_sha256(path)
    with pytest.raises(ChecksumMismatchError, match=f'expected {sha256}, got {actual}'):
        load_from_norm_plugins('norm_plugins://my_sn')


def test_hash_in_file_name_is_verified_without_a_recorded_one(home, tiny_state):
    path, _ = save_converted(tiny_state, 'resnet50_sn_8x2', home / 'checkpoints')
    torch.save({'sn1.weight': torch.zeros(4)}, path)
    with pytest.raises(ChecksumMismatchError, match=r'expected [0-9a-f]{8}, got [0-9a-f]{64}'):
        load_from_norm_plugins('norm_plugins://resnet50_sn_8x2')


def test_missing_file_fails_fast_with_urls_path_and_command(home):
    start = time.monotonic()
    with pytest.raises(PretrainedFileMissingError) as info:
        load_from_norm_plugins('norm_plugins://resnet50_sn_8x4')
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert 'https://drive.google.com/open?id=1x_ZR0ZFtvRzZHkFZVXeVoLeXoJKX-LrZ' in message
    assert 'https://pan.baidu.com/s/1qdzaB9r6DffTm_DXTG7MAw' in message
    assert str(home / 'checkpoints' / 'resnet50_sn_8x4-<sha256[:8]>.pth') in message
    assert 'convert_pretrained.py resnet50_sn_8x4 /path/to/downloaded/file' in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_recorded_file_names_it(home, tmp_path):
    _record_entry(tmp_path, 'my_sn', 'ab' * 32)
    with pytest.raises(PretrainedFileMissingError, match=str(home / 'checkpoints' / 'my_sn-abababab.pth')):
        load_from_norm_plugins('norm_plugins://my_sn')


def test_unknown_name(home):
    with pytest.raises(UnknownPretrainedError, match="no pretrained backbone named 'nope'"):
        CheckpointLoader.load_checkpoint('norm_plugins://nope')


def test_several_candidates_without_recorded_hash_are_refused(home, tiny_state):
    save_converted(tiny_state, 'resnet50_sn_8x2', home / 'checkpoints')
    save_converted({'x': torch.ones(1)}, 'resnet50_sn_8x2', home / 'checkpoints')
    with pytest.raises(PretrainedFileMissingError, match='several converted files match'):
        load_from_norm_plugins('norm_plugins://resnet50_sn_8x2')


def test_files_with_python_objects_are_refused(home):
    folder = home / 'checkpoints'
    folder.mkdir(parents=True)
    tmp = folder / 'tmp.pth'
    torch.save({'weights': torch.ones(1), 'meta': {'config': object.__new__(_Opaque)}}, tmp)
    path = folder / f'resnet50_sn_8x2-{file_sha256(tmp)[:8]}.pth'
    tmp.rename(path)
    with pytest.raises(ConversionError, match='not a plain state dict of tensors'):
        load_from_norm_plugins('norm_plugins://resnet50_sn_8x2')


class _Opaque:
    pass
