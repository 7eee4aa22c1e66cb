"""Synthetic ResNet-50 checkpoints in each authors' layout convert strictly into mmdet's and mmseg's
ResNet and compute what the authors' models compute; bad sources fail naming the keys."""
import argparse
import copy

import pytest
import torch
from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS

import pretrained_helpers as authors
from norm_plugins.pretrained import (ChecksumMismatchError, ConversionError, IncompatibleBackboneError,
                                     check_backbone_fits, convert_state_dict, get_entry, read_source_checkpoint,
                                     save_converted, unwrap_state_dict)
from norm_plugins.pretrained.conversion import convert_checkpoint_file

# case -> (manifest entry, authors' model in that entry's layout)
CASES = {
    'sn': ('resnet50_sn_8x2', lambda: authors.authors_sn_resnet(50)),
    'sn_without_bn': ('resnet50_sn_8x1', lambda: authors.authors_sn_resnet(50, using_bn=False)),
    'gn_ws': ('resnet50_gn_ws', lambda: authors.authors_gn_ws_resnet(50)),
    'gn_ws_openmmlab_names': ('resnet50_gn_ws', lambda: authors.authors_gn_ws_resnet(50, name='gn')),
    'bcn_ws': ('resnet50_bcn_ws', lambda: authors.authors_bcn_ws_resnet(50)),
}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv('NORM_PLUGINS_HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('NORM_PLUGINS_MANIFESTS', raising=False)


# One image at 64x64 keeps layer4 at 2x2, where the authors' unbiased instance variance is defined.
# Training uses two images, in float64: batch statistics of a few values amplify float32 rounding.
INPUTS = {False: torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
          True: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}


@pytest.fixture(scope='module', params=list(CASES))
def converted(request, tmp_path_factory):
    """(entry, authors' model, source file, converted state dict) of one case."""
    name, build = CASES[request.param]
    entry = get_entry(name)
    reference = authors.randomize_(build())
    source = authors.save_authors_checkpoint(reference, tmp_path_factory.mktemp(request.param) / 'authors.pth')
    report = convert_state_dict(unwrap_state_dict(read_source_checkpoint(source)), entry)
    assert [key for key, _ in report.dropped] == ['fc.weight', 'fc.bias']
    path, _ = save_converted(report.state_dict, name, source.parent)
    # The written file is a plain state dict that torch.load(weights_only=True) accepts.
    state_dict = torch.load(path, weights_only=True)
    return entry, reference, source, state_dict


def _assert_same_outputs(model, reference, training):
    """Same stage outputs up to rounding (a wrong mapping gives differences of order 1)."""
    if training:
        # Copies: the authors' BatchNorm would otherwise update the shared reference.
        model, reference = copy.deepcopy(model).double(), copy.deepcopy(reference).double()
    model.train(training)
    reference.train(training)
    with torch.no_grad():
        outs, expected = model(INPUTS[training]), reference(INPUTS[training])
    assert len(outs) == len(expected) == 4
    rtol = 1e-7 if training else 1e-4
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=rtol, atol=rtol * float(exp.abs().max()))


def test_loads_into_mmdet_resnet_and_computes_the_same(converted):
    entry, reference, _, state_dict = converted
    model = MMDET_MODELS.build(entry.backbone_cfg())
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_outputs(model, reference, training=False)
    _assert_same_outputs(model, reference, training=True)


@pytest.mark.parametrize('converted', ['sn', 'gn_ws', 'bcn_ws'], indirect=True)
def test_loads_into_mmseg_resnet_and_computes_the_same(converted):
    entry, reference, _, state_dict = converted
    model = MMSEG_MODELS.build(entry.backbone_cfg())
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_outputs(model, reference, training=False)


@pytest.mark.parametrize('converted', ['sn'], indirect=True)
def test_mmseg_resnetv1c_cannot_take_the_authors_stem(converted):
    entry, _, _, state_dict = converted
    cfg = dict(entry.backbone_cfg(), type='ResNetV1c')
    cfg.pop('deep_stem')
    with pytest.raises(IncompatibleBackboneError, match=r"deep stem.*7x7 'conv1' stem.*type='ResNet'"):
        check_backbone_fits(cfg, entry, 'model.backbone')
    # Why the check exists: a non-strict load (what init_cfg Pretrained does) would silently leave
    # the deep stem at random initialization.
    result = MMSEG_MODELS.build(cfg).load_state_dict(state_dict, strict=False)
    assert any(key.startswith('stem.') for key in result.missing_keys)
    assert 'conv1.weight' in result.unexpected_keys


def _source_state(converted):
    return unwrap_state_dict(read_source_checkpoint(converted[2]))


def test_leftover_source_key_is_reported(converted):
    entry = converted[0]
    source = dict(_source_state(converted), **{'layer1.0.extra_scale': torch.ones(3)})
    with pytest.raises(ConversionError, match=r"source keys neither mapped nor dropped: \['layer1.0.extra_scale'\]"):
        convert_state_dict(source, entry)


def test_unfilled_backbone_key_is_reported(converted):
    entry = converted[0]
    source = _source_state(converted)
    removed = next(k for k in source if k.startswith('layer4.2.') and 'conv' not in k)
    del source[removed]
    with pytest.raises(ConversionError, match=r'backbone keys left unfilled: \[.layer4\.2\.'):
        convert_state_dict(source, entry)


@pytest.mark.parametrize('converted, deeper', [('sn', 'resnet101_sn_8x32'), ('gn_ws', 'resnet101_gn_ws'),
                                               ('bcn_ws', 'resnet101_bcn_ws')], indirect=['converted'])
def test_source_of_another_depth_is_refused(converted, deeper):
    with pytest.raises(ConversionError, match=r"backbone keys left unfilled: \['layer3\.\d+\."):
        convert_state_dict(_source_state(converted), get_entry(deeper))


@pytest.mark.parametrize('converted', ['sn_without_bn'], indirect=True)
def test_sn_without_bn_source_does_not_fit_an_sn_with_bn_entry(converted):
    with pytest.raises(ConversionError, match=r"sn1.mean_weight -> sn1.mean_weight: \(2,\) vs backbone \(3,\)"):
        convert_state_dict(_source_state(converted), get_entry('resnet50_sn_8x2'))


@pytest.mark.parametrize('converted', ['sn', 'bcn_ws'], indirect=True)
def test_running_statistics_can_be_reset(converted):
    entry = converted[0]
    kept = convert_state_dict(_source_state(converted), entry, running_stats='keep').state_dict
    report = convert_state_dict(_source_state(converted), entry, running_stats='reset')
    stats = [k for k in kept if k.rsplit('.', 1)[1] in ('running_mean', 'running_var', 'num_batches_tracked')]
    assert sorted(report.reset) == sorted(stats) and stats
    for key, value in report.state_dict.items():
        leaf = key.rsplit('.', 1)[1]
        if leaf == 'running_var':
            assert torch.equal(value, torch.ones_like(value))
        elif leaf in ('running_mean', 'num_batches_tracked'):
            assert not value.any()
        else:
            assert torch.equal(value, kept[key])


@pytest.mark.parametrize('converted', ['sn', 'sn_without_bn'], indirect=True)
def test_sn_logits_and_reshaped_tensors_are_taken_as_they_are(converted):
    entry, reference, _, state_dict = converted
    source = reference.state_dict()
    assert torch.equal(state_dict['layer2.0.sn2.mean_weight'], source['layer2.0.sn2.mean_weight'])
    assert torch.equal(state_dict['layer2.0.downsample.1.weight'], source['layer2.0.downsample.1.weight'].view(-1))
    if entry.uses_batch_statistics:
        assert torch.equal(state_dict['sn1.running_var'], source['sn1.running_var'].view(-1))
        assert state_dict['sn1.num_batches_tracked'].dtype == torch.long
    else:
        assert 'sn1.running_var' not in state_dict and state_dict['sn1.var_weight'].shape == (2,)


def test_published_hash_prefix_of_the_source_is_checked(tmp_path):
    source = authors.save_authors_checkpoint(authors.authors_gn_ws_resnet(50), tmp_path / 'resnet50_gn_ws.pth')
    with pytest.raises(ChecksumMismatchError, match=r'expected 15beedd8, got [0-9a-f]{64}'):
        convert_checkpoint_file('resnet50_gn_ws', source, tmp_path / 'out')


def test_pickled_objects_in_the_source_need_trust(tmp_path):
    model = authors.randomize_(authors.authors_sn_resnet(50))
    path = tmp_path / 'with_args.pth'
    state = {'state_dict': model.state_dict(), 'args': argparse.Namespace(arch='resnetv1sn50')}
    torch.save(state, path)
    with pytest.raises(ConversionError, match='--trust-pickle'):
        read_source_checkpoint(path)
    out, sha256, report = convert_checkpoint_file('resnet50_sn_8x2', path, tmp_path / 'out', trust_pickle=True)
    assert out.name == f'resnet50_sn_8x2-{sha256[:8]}.pth' and len(report.dropped) == 2
