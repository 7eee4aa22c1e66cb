"""Published digests of the authors' files: Source.SHA256 (full or a published prefix) and Source.MD5
(where the authors publish only an MD5, as for SSN), checked by the field that names the algorithm,
never one read as the other; the conversion report says which digest was verified."""
import copy
import hashlib

import pytest
import yaml

import pretrained_helpers as authors
from norm_plugins.pretrained import (ChecksumMismatchError, ManifestError, PretrainedFileMissingError, get_entry,
                                     load_manifests)
from norm_plugins.pretrained.conversion import convert_checkpoint_file
from norm_plugins.pretrained.manifest import read_manifest
from norm_plugins.pretrained.store import file_digest, load_from_norm_plugins, verify_source

# The SSN model zoo (github.com/switchablenorms/Sparse_SwitchNorm README): name -> (images per GPU,
# top-1, top-5, MD5).
SSN_ZOO = {
    'resnet50_ssn_8x32': (32, 77.25, 93.29, '5c9fb111577b040e62461db51ffce69b'),
    'resnet50_ssn_8x16': (16, 76.98, 93.29, 'd7085632529a9b1945a28a4d3bf4cacb'),
    'resnet50_ssn_8x8': (8, 76.75, 93.33, 'af85a39920644421fc48e216aba6ff0e'),
    'resnet50_ssn_8x4': (4, 76.07, None, '949d4bd54a7c63a3371b941eb4d3ea69'),
    'resnet50_ssn_8x2': (2, 75.85, 92.73, 'dadb0f1a0c49c31aedd6cb83d4996a03'),
}


@pytest.fixture
def manifests(tmp_path, monkeypatch):
    """An empty extra manifest folder (and cache) of the test's own."""
    monkeypatch.setenv('NORM_PLUGINS_HOME', str(tmp_path / 'home'))
    monkeypatch.setenv('NORM_PLUGINS_MANIFESTS', str(tmp_path / 'manifests'))
    (tmp_path / 'manifests').mkdir()
    return tmp_path / 'manifests'


def _entry_raw(name, new_name, **source):
    """A shipped entry renamed, with its Source digests replaced (and their Unknowns kept consistent)."""
    raw = copy.deepcopy(get_entry(name).raw)
    raw['Name'] = new_name
    for key, value in source.items():
        raw['Source'][key] = value
        raw.setdefault('Unknowns', {}).pop(f'Source.{key}', None)
        if value is None:
            raw['Unknowns'][f'Source.{key}'] = 'not published'
    return raw


def _write(folder, *raws):
    path = folder / 'test.yml'
    path.write_text(yaml.safe_dump({'Models': list(raws)}, sort_keys=False))
    return path


def test_ssn_entries_record_the_published_md5_and_no_sha256(manifests):
    entries = load_manifests()
    for name, (per_gpu, top1, top5, md5) in SSN_ZOO.items():
        entry = entries[name]
        assert (entry.gpus, entry.images_per_gpu, entry.key_layout) == (8, per_gpu, 'ssn_resnet')
        assert entry.source_md5 == md5 and entry.source_sha256 is None
        assert entry.source_digests() == {'md5': md5}
        assert 'MD5' in entry.unknown_reason('Source.SHA256')
        metrics = entry.get('Results')[0]['Metrics']
        assert (metrics['Top 1 Accuracy'], metrics['Top 5 Accuracy']) == (top1, top5)
        # SSN2d as the authors trained it: three normalizers, unbiased instance variance, momentum 0.997
        # in their kept-fraction convention.
        assert entry.norm_cfg == {'type': 'SSN', 'normalizers': ['in', 'ln', 'bn'], 'unbiased_instance_var': True,
                                  'momentum': 0.003}
        assert entry.uses_batch_statistics
    assert '96.71' in entries['resnet50_ssn_8x4'].unknown_reason('Results.0.Metrics.Top 5 Accuracy')


@pytest.mark.parametrize('source, message', [
    (dict(SHA256='dadb0f1a0c49c31aedd6cb83d4996a03'),
     r"Source.SHA256 'dadb0f1a0c49c31aedd6cb83d4996a03' has the 32 hex digits of an MD5. If the authors published "
     r'an MD5, record it as Source.MD5'),
    (dict(SHA256='abc'), r'Source.SHA256 must be the published sha256 or a prefix of it \(8 to 64'),
    (dict(MD5='DADB0F1A0C49C31AEDD6CB83D4996A03'), r'Source.MD5 must be the 32 lowercase hex digits'),
    (dict(MD5='dadb0f1a'), r'Source.MD5 must be the 32 lowercase hex digits of the published MD5'),
])
def test_digest_fields_are_validated_by_their_algorithm(manifests, source, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(_write(manifests, _entry_raw('resnet50_sn_8x2', 'digest_test', **source)))


def _source_file(tmp_path):
    return authors.save_authors_checkpoint(authors.randomize_(authors.authors_sn_resnet(50)), tmp_path / 'src.pth')


def test_md5_is_verified_and_reported(manifests, tmp_path):
    source = _source_file(tmp_path)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    assert file_digest(source, 'md5') == md5
    _write(manifests, _entry_raw('resnet50_sn_8x2', 'md5_only', MD5=md5),
           _entry_raw('resnet50_sn_8x2', 'both', MD5=md5, SHA256=file_digest(source)[:8]),
           _entry_raw('resnet50_sn_8x2', 'wrong_md5', MD5='0' * 32))
    check = verify_source(get_entry('md5_only'), source)
    assert check == (f'source verified against the published MD5 {md5} (no sha256 is published; MD5 detects a '
                     'corrupt or different file, not a forged one)')
    assert verify_source(get_entry('both'), source) == \
        f'source verified against the published sha256 prefix {file_digest(source)[:8]} and MD5 {md5}'
    assert verify_source(get_entry('resnet50_sn_8x2'), source) == \
        "source not verified: the authors published no digest of resnet50_sn_8x2's file"
    with pytest.raises(ChecksumMismatchError) as info:
        verify_source(get_entry('wrong_md5'), source)
    assert str(info.value) == (
        f'source checkpoint of wrong_md5: MD5 mismatch for {source}: expected {"0" * 32}, got {md5}. The file is '
        "corrupt, truncated or a different checkpoint; download it again from the entry's Source.URLs "
        '(python tools/convert_pretrained.py --list shows them).')
    path, _, report = convert_checkpoint_file('md5_only', source, tmp_path / 'out')
    assert path.is_file() and report.summary().splitlines()[0] == check
    with pytest.raises(ChecksumMismatchError, match='MD5 mismatch'):
        convert_checkpoint_file('wrong_md5', source, tmp_path / 'out')


def test_an_md5_is_never_read_as_a_sha256_prefix(manifests, tmp_path):
    source = _source_file(tmp_path)
    sha_start = file_digest(source)[:32]
    # A prefix of the file's sha256 recorded as MD5 does not match: MD5 fields are compared with MD5s.
    _write(manifests, _entry_raw('resnet50_sn_8x2', 'sha_as_md5', MD5=sha_start))
    with pytest.raises(ChecksumMismatchError, match=f'MD5 mismatch .*expected {sha_start}, got '
                                                    f'{file_digest(source, "md5")}'):
        verify_source(get_entry('sha_as_md5'), source)


def test_missing_converted_file_names_the_published_md5(manifests):
    with pytest.raises(PretrainedFileMissingError) as info:
        load_from_norm_plugins('norm_plugins://resnet50_ssn_8x2')
    message = str(info.value)
    assert 'Download the source checkpoint (MD5 dadb0f1a0c49c31aedd6cb83d4996a03) from:' in message
    assert 'https://drive.google.com/open?id=1r485fLeSAwS5zKrxcAtGxa_mPr1lWcoS' in message
    assert 'convert_pretrained.py resnet50_ssn_8x2 /path/to/downloaded/file' in message

