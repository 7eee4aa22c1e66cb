"""NormAwareOptimWrapperConstructor: plug-in norms get BatchNorm's treatment, mixture logits their own
multipliers, and everything else is exactly mmengine's default constructor."""
import pytest
import torch
from mmengine.optim import DefaultOptimWrapperConstructor, build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

import norm_plugins  # noqa: F401  (registers the constructor)
from norm_plugins import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm
from norm_plugins.optim import NormAwareOptimWrapperConstructor

LR, WD = 0.1, 1e-3
PARAMWISE_CFGS = [
    dict(norm_decay_mult=0.),
    dict(norm_decay_mult=0.5, bias_lr_mult=2., bias_decay_mult=0.25),
    dict(bias_lr_mult=2., bias_decay_mult=0.25),
    dict(flat_decay_mult=0.3, dwconv_decay_mult=0.7),
    dict(norm_decay_mult=0., custom_keys={'1.weight': dict(lr_mult=3., decay_mult=2.)}),
]


def network(norm):
    """conv -> norm -> depth-wise conv -> norm -> linear; ``norm(C)`` builds the norm layer."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), norm(8), nn.Conv2d(8, 8, 3, groups=8),
                         norm(8), nn.Flatten(), nn.Linear(8, 2))


def settings(model, paramwise_cfg, constructor=NormAwareOptimWrapperConstructor):
    """{parameter name: {option: value}} of the optimizer the constructor builds."""
    cfg = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=LR, momentum=0.9, weight_decay=WD))
    wrapper = constructor(cfg, paramwise_cfg)(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in wrapper.optimizer.param_groups:
        for param in group['params']:
            out[names[id(param)]] = {k: v for k, v in group.items() if k != 'params'}
    assert set(out) == {n for n, p in model.named_parameters() if p.requires_grad}
    return out


@pytest.mark.parametrize('paramwise_cfg', PARAMWISE_CFGS + [None])
@pytest.mark.parametrize('norm', [nn.BatchNorm2d, lambda c: nn.GroupNorm(4, c), nn.Identity])
def test_identical_to_default_without_plugin_norms(norm, paramwise_cfg):
    model = network(norm)
    assert settings(model, paramwise_cfg) == settings(model, paramwise_cfg, DefaultOptimWrapperConstructor)


@pytest.mark.parametrize('paramwise_cfg', PARAMWISE_CFGS)
@pytest.mark.parametrize('plugin', [SwitchableNorm, SyncSwitchableNorm, lambda c: BatchChannelNorm(c, 4)])
def test_plugin_affine_params_treated_like_batchnorm(plugin, paramwise_cfg):
    """Every option lands on the plug-in's weight/bias exactly as on BatchNorm2d's in the same place."""
    bn = settings(network(nn.BatchNorm2d), paramwise_cfg)
    ours = settings(network(plugin), paramwise_cfg)
    for layer in ('1', '3'):
        for name in ('weight', 'bias'):
            assert ours[f'{layer}.{name}'] == bn[f'{layer}.{name}'], (layer, name)
    rest = {n: s for n, s in ours.items() if n.split('.')[0] not in ('1', '3')}
    assert rest == {n: s for n, s in bn.items() if n.split('.')[0] not in ('1', '3')}


def test_every_bcn_affine_param_is_a_norm_param():
    model = network(lambda c: BatchChannelNorm(c, 4))
    ours = settings(model, dict(norm_decay_mult=0.2))
    names = [name for name, _ in model[1].named_parameters()]
    assert len(names) == 4  # per-channel and per-group scale and shift
    for name in names:
        assert ours[f'1.{name}']['weight_decay'] == pytest.approx(WD * 0.2)
    assert ours['0.weight']['weight_decay'] == WD


@pytest.mark.parametrize('paramwise_cfg', [None, {}, dict(bias_decay_mult=0.5, flat_decay_mult=0.2)])
def test_without_norm_options_plugin_norms_get_default_settings(paramwise_cfg):
    model = network(SwitchableNorm)
    ours = settings(model, paramwise_cfg)
    assert ours == settings(model, paramwise_cfg, DefaultOptimWrapperConstructor)
    assert ours['1.weight']['weight_decay'] == pytest.approx(WD * (0.2 if paramwise_cfg else 1))


@pytest.mark.parametrize('tied', [False, True])
def test_mixture_logits_multipliers(tied):
    model = network(lambda c: SwitchableNorm(c, tied=tied))
    logits = ['mean_weight'] if tied else ['mean_weight', 'var_weight']
    ours = settings(model, dict(norm_decay_mult=0.5, mixture_decay_mult=0.1, mixture_lr_mult=3.))
    for layer in ('1', '3'):
        for name in logits:
            assert ours[f'{layer}.{name}']['weight_decay'] == pytest.approx(WD * 0.1)
            assert ours[f'{layer}.{name}']['lr'] == pytest.approx(LR * 3.)
        assert ours[f'{layer}.weight']['weight_decay'] == pytest.approx(WD * 0.5)
        assert ours[f'{layer}.weight']['lr'] == LR


def test_mixture_logits_follow_norm_decay_mult_when_not_given_their_own():
    ours = settings(network(SwitchableNorm), dict(norm_decay_mult=0.))
    for name in ('mean_weight', 'var_weight'):
        assert ours[f'1.{name}']['weight_decay'] == 0.
        assert ours[f'1.{name}']['lr'] == LR


def test_custom_keys_win_over_norm_rules():
    ours = settings(network(SwitchableNorm), dict(
        norm_decay_mult=0., mixture_decay_mult=0., mixture_lr_mult=5.,
        custom_keys={'3.mean_weight': dict(lr_mult=2., decay_mult=1.), '3.bias': dict(decay_mult=3.)}))
    assert ours['3.mean_weight']['lr'] == pytest.approx(LR * 2.)
    assert ours['3.mean_weight']['weight_decay'] == pytest.approx(WD)
    assert ours['3.bias']['weight_decay'] == pytest.approx(WD * 3.)
    assert ours['1.mean_weight']['lr'] == pytest.approx(LR * 5.)
    assert ours['3.var_weight']['weight_decay'] == 0.


def test_zero_decay_really_leaves_norm_params_alone():
    """One SGD step with zero gradients: only weight decay moves parameters."""
    model = network(SwitchableNorm)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=LR, weight_decay=WD),
               constructor='NormAwareOptimWrapperConstructor',
               paramwise_cfg=dict(norm_decay_mult=0., mixture_decay_mult=0.))
    wrapper = build_optim_wrapper(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    wrapper.step()
    for name, param in model.named_parameters():
        if name.split('.')[0] in ('1', '3'):
            torch.testing.assert_close(param, before[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(param, before[name] * (1 - LR * WD))


def test_registered_in_mmengine():
    registered = OPTIM_WRAPPER_CONSTRUCTORS.get('NormAwareOptimWrapperConstructor')
    assert registered is NormAwareOptimWrapperConstructor


@pytest.mark.parametrize('paramwise_cfg, optimizer, match', [
    (dict(mixture_decay_mult=-1.), dict(lr=0.1, weight_decay=0.1),
     'mixture_decay_mult must be a number >= 0'),
    (dict(mixture_lr_mult='2'), dict(lr=0.1), 'mixture_lr_mult must be a number >= 0'),
    (dict(mixture_decay_mult=0.), dict(lr=0.1), 'needs optimizer.weight_decay'),
])
def test_bad_options_are_rejected(paramwise_cfg, optimizer, match):
    with pytest.raises(ValueError, match=match):
        NormAwareOptimWrapperConstructor(
            dict(type='OptimWrapper', optimizer=dict(type='SGD', **optimizer)), paramwise_cfg)
