"""The SSN optimizer settings through NormAwareOptimWrapperConstructor: ratio logits at lr / 10 without
weight decay, their gradient norm clipped alone (after AMP's unscale), in a real Runner and on resume."""
import pytest
import torch
from mmengine.optim import OptimWrapper, build_optim_wrapper
from torch import nn

import norm_plugins  # noqa: F401 - registers the constructor and wrappers
from norm_plugins.layers import SparseSwitchableNorm, SwitchableNorm
from norm_plugins.optim import MixtureClipAmpOptimWrapper, MixtureClipOptimWrapper
from norm_plugins.optim.mixture_clip import MIXTURE_CLIP_FLAG
from norm_plugins.runner import mmengine_checkpoint_globals

LR, WD = 0.1, 1e-2
SSN_PARAMWISE = dict(norm_decay_mult=0., mixture_lr_mult=0.1, mixture_decay_mult=0.,
                     mixture_clip_grad=dict(max_norm=1.0))


def network():
    """conv -> SSN (K = 3) -> conv -> group SSN ((2, 2) logits) -> conv -> SN."""
    return nn.Sequential(nn.Conv2d(2, 4, 1), SparseSwitchableNorm(4), nn.Conv2d(4, 4, 1),
                         SparseSwitchableNorm(4, ratio_groups=2, normalizers=('in', 'ln')), nn.Conv2d(4, 4, 1),
                         SwitchableNorm(4, tied=True))


def build(model, paramwise_cfg=SSN_PARAMWISE, **wrapper):
    return build_optim_wrapper(model, dict(optimizer=dict(type='SGD', lr=LR, momentum=0.0, weight_decay=WD),
                                           constructor='NormAwareOptimWrapperConstructor',
                                           paramwise_cfg=paramwise_cfg, **wrapper))


def logits_of(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(('mean_weight', 'var_weight'))}


def test_ssn_settings_give_the_logits_their_own_groups_and_clipping():
    model = network()
    wrapper = build(model)
    assert type(wrapper) is MixtureClipOptimWrapper
    logits = logits_of(model)
    assert {id(p) for p in wrapper.mixture_params} == {id(p) for p in logits.values()}
    assert logits['3.mean_weight'].shape == (2, 2)
    for group in wrapper.optimizer.param_groups:
        assert MIXTURE_CLIP_FLAG not in group, 'the flag stays out of optimizer state dicts'
        (param,) = group['params']
        if any(param is p for p in logits.values()):
            assert group['lr'] == pytest.approx(LR * 0.1) and group['weight_decay'] == 0
    assert MIXTURE_CLIP_FLAG not in str(wrapper.state_dict()['param_groups'])


def _step_with_gradients(wrapper, model, scale=1.0):
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 5 * scale
    before = {n: (p.detach().clone(), p.grad.clone() / scale) for n, p in model.named_parameters()}
    wrapper.step()
    return before


@pytest.mark.parametrize('global_clip', [None, dict(max_norm=2.0)])
def test_step_clips_the_logits_jointly_and_nothing_else(global_clip):
    model = network()
    wrapper = build(model, clip_grad=global_clip)
    before = _step_with_gradients(wrapper, model)
    names = set(logits_of(model))
    mixture_norm = torch.cat([before[n][1].flatten() for n in names]).norm()
    assert mixture_norm > 1
    clipped = {n: before[n][1] * (1.0 / (mixture_norm + 1e-6)) if n in names else before[n][1] for n in before}
    if global_clip is not None:  # then all parameters, the clipped logits included
        total = torch.cat([g.flatten() for g in clipped.values()]).norm()
        clipped = {n: g * min(1.0, 2.0 / (total + 1e-6)) for n, g in clipped.items()}
    for name, param in model.named_parameters():
        value, _ = before[name]
        lr = LR * 0.1 if name in names else LR
        decay = 0.0 if name.split('.')[0] in ('1', '3', '5') else WD  # the norms: norm_decay_mult, mixture_decay_mult
        expected = value - lr * (clipped[name] + decay * value)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
    assert wrapper.message_hub.get_scalar('train/mixture_grad_norm').current() == pytest.approx(float(mixture_norm))


@pytest.mark.filterwarnings('ignore:.*GradScaler')
def test_amp_wrapper_clips_after_unscaling(monkeypatch):
    """AmpOptimWrapper (``--amp``) becomes MixtureClipAmpOptimWrapper; with a loss scale of 1024 the
    logits are clipped at their true gradient norm, and the step is SGD on the unscaled gradients.
    (mmengine's AMP wrapper asks for a GPU; the CPU GradScaler stands in for the CUDA one.)"""
    from mmengine.optim.optimizer import amp_optimizer_wrapper
    monkeypatch.setattr(amp_optimizer_wrapper, 'is_cuda_available', lambda: True)
    model, twin = network(), network()
    twin.load_state_dict(model.state_dict())
    wrapper = build(model, type='AmpOptimWrapper')
    assert type(wrapper) is MixtureClipAmpOptimWrapper
    wrapper.loss_scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    x = torch.randn(2, 2, 3, 3)
    target = torch.arange(4.0).view(1, 4, 1, 1)
    wrapper.update_params((model(x) * target).square().sum())
    amp_norm = wrapper.message_hub.get_scalar('train/mixture_grad_norm').current()
    plain = build(twin)
    (twin(x) * target).square().sum().backward()
    plain.step()
    true_norm = plain.message_hub.get_scalar('train/mixture_grad_norm').current()
    assert true_norm > 1 and amp_norm == pytest.approx(true_norm, rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_runner_trains_logs_and_resumes_with_the_settings(tmp_path):
    from test_ssn_radius_hook import StopAfter, ssn_runner
    optim = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
                 constructor='NormAwareOptimWrapperConstructor', paramwise_cfg=SSN_PARAMWISE)
    runner = ssn_runner(tmp_path, [dict(type='SSNRadiusHook'), StopAfter(2)], max_iters=4, optim_wrapper=optim,
                        checkpoint_interval=2)
    runner.train()
    assert isinstance(runner.optim_wrapper, MixtureClipOptimWrapper)
    assert runner.message_hub.get_scalar('train/mixture_grad_norm').current() > 0
    resumed = ssn_runner(tmp_path, [dict(type='SSNRadiusHook')], max_iters=4, optim_wrapper=optim, resume=True)
    with mmengine_checkpoint_globals():
        resumed.train()
    assert resumed.iter == 4
    assert {id(p) for p in resumed.optim_wrapper.mixture_params} == {id(p) for p in logits_of(resumed.model).values()}
    assert all(MIXTURE_CLIP_FLAG not in g for g in resumed.optim_wrapper.param_groups)


@pytest.mark.parametrize('clip, match', [
    (dict(), 'max_norm'), (dict(max_norm=0), 'max_norm must be a number > 0'), ([1.0], 'dict\\(max_norm'),
    (dict(max_norm=1.0, type='value'), 'dict\\(max_norm'), (dict(max_norm=1.0, norm_type=-1), 'norm_type'),
])
def test_bad_clip_options_are_refused(clip, match):
    with pytest.raises(ValueError, match=f'paramwise_cfg.mixture_clip_grad.*{match}|{match}'):
        build(network(), dict(mixture_clip_grad=clip))


def test_other_wrapper_types_are_refused_clearly():
    with pytest.raises(ValueError, match='works with optim_wrapper type OptimWrapper or AmpOptimWrapper'):
        build(network(), type='ApexOptimWrapper')
    assert type(build(network(), type=OptimWrapper)) is MixtureClipOptimWrapper
    assert type(build(network(), type='MixtureClipOptimWrapper')) is MixtureClipOptimWrapper


def test_custom_keys_set_the_logits_options_and_clipping_still_covers_them():
    model = network()
    wrapper = build(model, dict(SSN_PARAMWISE, custom_keys={'1.mean_weight': dict(lr_mult=2.0)}))
    (group,) = [g for g in wrapper.param_groups if g['params'][0] is model[1].mean_weight]
    assert group['lr'] == pytest.approx(2 * LR)
    assert any(p is model[1].mean_weight for p in wrapper.mixture_params) and len(wrapper.mixture_params) == 5


def test_without_clipping_the_wrapper_is_mmengines():
    assert type(build(network(), dict(mixture_lr_mult=0.1))) is OptimWrapper
