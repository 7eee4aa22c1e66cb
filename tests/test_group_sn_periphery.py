"""Group SN (``ratio_groups=G``) outside the layer: deployment, the ratio analysis and its figures,
SNHardRatiosHook, the optimizer constructor, the pretrained checks and the conversion of a
single-group SN checkpoint into a group-SN backbone (numbers checked in float64)."""
import copy
import logging

import pytest
import torch
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.optim import build_optim_wrapper
from torch import nn

import norm_plugins  # noqa: F401 - registers SN
import pretrained_helpers as authors
from norm_plugins.analysis import (compare_ratios, group_means, ratio_scalars, ratio_table, ratios_from_model,
                                   ratios_from_state_dict)
from norm_plugins.analysis.plots import plot_layer_ratios
from norm_plugins.deploy import ChannelAffine, deploy_model
from norm_plugins.hooks import SNHardRatiosHook
from norm_plugins.layers import SwitchableNorm, SyncSwitchableNorm
from norm_plugins.pretrained import (ConversionError, IncompatibleBackboneError, check_backbone_fits,
                                     convert_state_dict, get_entry)

INDEX = {'in': 0, 'ln': 1, 'bn': 2}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv('NORM_PLUGINS_HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('NORM_PLUGINS_MANIFESTS', raising=False)


def _group_sn(channels, choices, cls=SwitchableNorm, seed=0, **kwargs):
    """A hardened group SN whose group g selects ``choices[g] = (mean, var)``, with trained-looking
    affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    layer = cls(channels, ratio_groups=len(choices), **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=generator))
        layer.running_mean.copy_(torch.randn(channels, generator=generator))
        layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        layer.mean_weight.zero_()
        layer.var_weight.zero_()
        for g, (mean, var) in enumerate(choices):
            layer.mean_weight[g, INDEX[mean]] = 1.0
            layer.var_weight[g, INDEX[var]] = 1.0
    return layer.harden()


def _expected64(layer, x):
    """The single normalizer every group of ``layer`` selects, as plain float64 formulas."""
    choice = {(m, v) for m, v in zip(*(r.reshape(-1, 3).argmax(-1).tolist() for r in layer.mixture_ratios()))}
    assert len(choice) == 1
    mean, var = choice.pop()
    assert mean == var
    x = x.double()
    if mean == INDEX['bn']:
        mu, sigma2 = layer.running_mean.double().view(1, -1, 1, 1), layer.running_var.double().view(1, -1, 1, 1)
    elif mean == INDEX['in']:
        mu, sigma2 = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
    else:  # LN over all channels, whatever the groups
        mu, sigma2 = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)
    y = (x - mu) / (sigma2 + layer.eps).sqrt()
    return y * layer.weight.double().view(1, -1, 1, 1) + layer.bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize('normalizer, groups', [('bn', 2), ('in', 4), ('ln', 2)])
def test_deploy_group_sn_selecting_one_normalizer_everywhere(normalizer, groups):
    torch.manual_seed(0)
    layer = _group_sn(8, [(normalizer, normalizer)] * groups).double().eval()
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    expected = _expected64(layer, x)
    # Without a conv before it, BN becomes a ChannelAffine; IN and LN the GroupNorm of the normalizer.
    model = nn.Sequential(layer)
    report = deploy_model(model)
    name = {'bn': 'SN(BN) -> ChannelAffine', 'in': 'SN -> GroupNorm(C) (IN)', 'ln': 'SN -> GroupNorm(1) (LN)'}
    assert report == {name[normalizer]: 1}
    kind = ChannelAffine if normalizer == 'bn' else nn.GroupNorm
    assert type(model[0]) is kind and not any(isinstance(m, SwitchableNorm) for m in model.modules())
    if normalizer != 'bn':
        assert model[0].num_groups == (8 if normalizer == 'in' else 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_deploy_group_sn_folds_bn_into_the_conv_and_keeps_mixed_groups():
    torch.manual_seed(0)
    mixed = _group_sn(8, [('bn', 'bn'), ('in', 'in')], seed=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _group_sn(8, [('bn', 'bn')] * 2), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), mixed,
                          nn.Conv2d(8, 8, 1), _group_sn(8, [('ln', 'bn')] * 4, cls=SyncSwitchableNorm, seed=2))
    reference = copy.deepcopy(model).double().eval()
    report = deploy_model(model)
    assert report == {'SN(BN) folded into conv': 1,
                      'SN kept (hard, channel groups select different normalizers: no standard layer)': 1,
                      'SN kept (hard, mean LN, var BN: no standard layer)': 1}
    assert type(model[1]) is nn.Identity and model[4] is mixed
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    deployed64 = copy.deepcopy(reference)
    deploy_model(deployed64)
    with torch.no_grad():
        torch.testing.assert_close(deployed64(x), reference(x), rtol=1e-11, atol=1e-11)
    # Soft group ratios are kept, and --harden (argmax per group) converts them.
    soft = nn.Sequential(nn.Conv2d(2, 4, 1), SwitchableNorm(4, ratio_groups=2))
    assert deploy_model(copy.deepcopy(soft)) == {'SN kept (soft ratios; harden first)': 1}
    assert deploy_model(soft, harden=True) == {'SN -> GroupNorm(C) (IN)': 1}  # equal logits: the first


def _grouped_model(seed=0):
    model = nn.Sequential(nn.Conv2d(2, 8, 1), SwitchableNorm(8, ratio_groups=2), nn.Conv2d(8, 6, 1),
                          SwitchableNorm(6), nn.Conv2d(6, 6, 1), SwitchableNorm(6, ratio_groups=3, tied=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                for logits in module._mixture_logits().values():
                    logits.copy_(torch.randn(logits.shape, generator=generator))
    return model


def test_ratio_rows_per_channel_group_from_model_and_state_dict():
    model = _grouped_model()
    rows = ratios_from_model(model)
    assert [row.label for row in rows] == ['1[0]', '1[1]', '3', '5[0]', '5[1]', '5[2]']
    assert [row.ratio_group for row in rows] == [0, 1, None, 0, 1, 2]
    logits = model[1].mean_weight.detach().double()
    for g in range(2):
        expected = logits[g].exp() / logits[g].exp().sum()  # softmax over the group's own vector, float64
        torch.testing.assert_close(rows[g].mean.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rows[3].mean, rows[3].var)  # tied: one vector per group
    from_state = ratios_from_state_dict({f'module.neck.{k}': v for k, v in model.state_dict().items()})
    assert [row.label for row in from_state] == [f'neck.{row.label}' for row in rows]
    for a, b in zip(rows, from_state):
        torch.testing.assert_close(a.mean, b.mean)
        torch.testing.assert_close(a.var, b.var)
    table = ratio_table(rows).splitlines()
    assert [line.split()[0] for line in table[2:]] == [row.label for row in rows]
    # Averages over a network part count each group as one vector.
    means = group_means(from_state)['neck']['mean']
    torch.testing.assert_close(means, torch.stack([row.mean for row in from_state]).mean(0))
    assert ratio_scalars(nn.ModuleDict({'neck': model}))['sn_ratios/neck/mean/in'] == pytest.approx(float(means[0]))


def test_compare_and_plot_per_channel_group(tmp_path):
    first, second = ratios_from_model(_grouped_model(0)), ratios_from_model(_grouped_model(1))
    rows = compare_ratios(first, second)
    assert [row[0].label for row in rows] == [row.label for row in first]
    assert rows[1][1] == pytest.approx(float(((first[1].mean - second[1].mean) *
                                              (first[1].mean.log() - second[1].mean.log())).sum()), rel=1e-5)
    svg = plot_layer_ratios(first, str(tmp_path / 'ratios'))[1]
    text = open(svg).read()
    assert '1[1]' in text and '5[2]' in text


class _Logger:
    def __init__(self):
        self.lines = []

    def info(self, line):
        self.lines.append(line)


def test_hard_ratios_hook_hardens_and_counts_each_channel_group():
    from types import SimpleNamespace
    model = nn.Sequential(nn.Conv2d(2, 4, 1), SwitchableNorm(4, ratio_groups=2), nn.Conv2d(4, 4, 1),
                          SwitchableNorm(4))
    with torch.no_grad():
        model[1].mean_weight.copy_(torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))
        model[1].var_weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
        model[3].mean_weight.copy_(torch.tensor([0.0, 2.0, 0.0]))
        model[3].var_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
    runner = SimpleNamespace(model=model, logger=_Logger())
    SNHardRatiosHook().before_train(runner)
    assert model[1].hard_ratios and model[3].hard_ratios
    assert torch.equal(model[1].mixture_ratios()[0], torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert runner.logger.lines[0].endswith('IN/BN: 1, LN/BN: 2')


def test_optimizer_constructor_treats_group_logits_as_mixture_logits():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), SwitchableNorm(4, ratio_groups=2))
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4), constructor='NormAwareOptimWrapperConstructor',
        paramwise_cfg=dict(norm_decay_mult=0.0, mixture_decay_mult=0.0, mixture_lr_mult=0.1)))
    settings = {id(p): (g['lr'], g['weight_decay']) for g in wrapper.param_groups for p in g['params']}
    assert settings[id(model[1].mean_weight)] == settings[id(model[1].var_weight)] == (pytest.approx(0.01), 0.0)
    assert model[1].mean_weight.shape == (2, 3)
    assert settings[id(model[1].weight)] == (0.1, 0.0) and settings[id(model[0].weight)] == (0.1, 1e-4)


def _backbone_cfg(entry, **norm):
    return dict(entry.backbone_cfg(), norm_cfg=dict(entry.norm_cfg, **norm))


def test_backbone_check_compares_ratio_groups_with_the_checkpoint():
    single, grouped = get_entry('resnet50_sn_8x2'), get_entry('resnet50_sn_8x2_g2')
    check_backbone_fits(_backbone_cfg(single), single)
    check_backbone_fits(_backbone_cfg(grouped), grouped)
    with pytest.raises(IncompatibleBackboneError) as info:
        check_backbone_fits(_backbone_cfg(single, ratio_groups=2), single, 'model.backbone')
    message = str(info.value)
    assert "model.backbone (type='ResNet') cannot load norm_plugins://resnet50_sn_8x2" in message
    assert ("norm_cfg has ratio_groups=2 (mixture logits (2, 3) per layer) but the checkpoint's layers have "
            "ratio_groups=1 (logits (3,))") in message
    assert "load one of ['resnet50_sn_8x2_g2'] instead" in message
    with pytest.raises(IncompatibleBackboneError, match=r"ratio_groups=1 .* ratio_groups=2 .*\['resnet50_sn_8x2'"):
        check_backbone_fits(_backbone_cfg(grouped, ratio_groups=1), grouped)
    with pytest.raises(IncompatibleBackboneError, match=r'ratio_groups=4 .*convert the source into an entry'):
        check_backbone_fits(_backbone_cfg(single, ratio_groups=4), single)


@pytest.fixture(scope='module')
def authors_sn():
    return authors.randomize_(authors.authors_sn_resnet(50))


def test_single_group_checkpoint_converts_into_group_sn_computing_the_same(authors_sn):
    entry = get_entry('resnet50_sn_8x2_g2')
    report = convert_state_dict(authors_sn.state_dict(), entry)
    layers = [k[:-len('.mean_weight')] for k in report.state_dict if k.endswith('.mean_weight')]
    assert len(layers) == 53
    assert sorted(report.expanded) == sorted(f'{layer}.{w}' for layer in layers for w in ('mean_weight', 'var_weight'))
    assert '106 expanded to ratio groups' in report.summary()
    source = authors_sn.state_dict()
    assert torch.equal(report.state_dict['layer3.1.sn2.var_weight'], source['layer3.1.sn2.var_weight'].expand(2, 3))
    model = MMDET_MODELS.build(entry.backbone_cfg())
    model.load_state_dict(report.state_dict, strict=True)
    assert model.layer3[1].sn2.mean_weight.shape == (2, 3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for training in (False, True):
        ours, theirs = copy.deepcopy(model).double(), copy.deepcopy(authors_sn).double()
        ours.train(training)  # mmdet's ResNet.train() returns None: no chaining
        theirs.train(training)
        with torch.no_grad():
            for out, expected in zip(ours(x), theirs(x)):
                torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_group_checkpoints_of_other_group_counts_are_refused(authors_sn):
    source = dict(authors_sn.state_dict())
    source['sn1.mean_weight'] = source['sn1.mean_weight'].expand(2, 3).clone()
    # Only single-group tensors are repeated; a checkpoint with groups of its own must fit as it is.
    with pytest.raises(ConversionError, match=r"(?s)shape mismatches: \['sn1.mean_weight -> sn1.mean_weight: "
                                              r"\(2, 3\) vs backbone \(3,\)'\].*ratio_groups"):
        convert_state_dict(source, get_entry('resnet50_sn_8x2'))
