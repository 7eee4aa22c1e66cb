"""SN hard ratios: harden(), hard_ratios=True, training steps and state-dict round trips."""
import pytest
import torch
from mmcv.cnn import build_norm_layer

import norm_plugins  # noqa: F401 - registers SN
from norm_plugins.layers import SwitchableNorm, SyncSwitchableNorm
from norm_plugins.layers.switchable_norm import HARD_LOGIT


def _trained_sn(**kwargs):
    layer = SwitchableNorm(4, **kwargs)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.2, 1.5, -0.3]))
        if layer.var_weight is not None:
            layer.var_weight.copy_(torch.tensor([2.0, 0.1, 1.9]))
    return layer


def _one_hot(index, size=3):
    return torch.nn.functional.one_hot(torch.tensor(index), size).float()


def test_harden_gives_argmax_one_hot_ratios_and_no_parameters():
    layer = _trained_sn().harden()
    ratios = layer.ratios()
    assert torch.equal(torch.stack(list(ratios['mean'].values())), _one_hot(1))
    assert torch.equal(torch.stack(list(ratios['var'].values())), _one_hot(0))
    assert [name for name, _ in layer.named_parameters()] == ['weight', 'bias']
    assert set(layer.state_dict()) >= {'mean_weight', 'var_weight'}
    assert torch.equal(layer.mean_weight, torch.tensor([HARD_LOGIT, 0.0, HARD_LOGIT]))
    assert layer.hard_ratios


def test_hard_forward_equals_single_normalizer_float64():
    layer = _trained_sn().double().harden().eval()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    # mean from LN, variance from IN (biased), in float64.
    var_in = x.var((2, 3), keepdim=True, unbiased=False)
    mu_ln = x.mean((1, 2, 3), keepdim=True)
    expected = (x - mu_ln) / (var_in + layer.eps).sqrt()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('optimizer_cls', [torch.optim.SGD, torch.optim.AdamW])
def test_hard_ratios_stay_fixed_through_a_training_step(optimizer_cls):
    torch.manual_seed(0)
    layer = _trained_sn()
    params_before = list(layer.parameters())
    layer.harden()
    # An optimizer built before hardening still holds the old logits: they get no gradient.
    optimizer = optimizer_cls(params_before, lr=0.5, weight_decay=0.1)
    logits = (layer.mean_weight.clone(), layer.var_weight.clone())
    weight = layer.weight.detach().clone()
    layer.train()
    loss = (layer(torch.randn(4, 4, 3, 3)) * torch.randn(4, 4, 3, 3)).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(layer.mean_weight, logits[0]) and torch.equal(layer.var_weight, logits[1])
    assert not torch.equal(layer.weight, weight)  # the rest trains
    assert torch.equal(torch.stack(list(layer.ratios()['mean'].values())), _one_hot(1))


def test_state_dict_round_trip_keeps_hard_ratios():
    hard = _trained_sn().harden()
    state = hard.state_dict()
    into_hard = SwitchableNorm(4, hard_ratios=True)
    into_hard.load_state_dict(state)
    into_soft = SwitchableNorm(4)
    into_soft.load_state_dict(state)
    for layer in (into_hard, into_soft):
        assert torch.equal(torch.stack(list(layer.ratios()['mean'].values())), _one_hot(1))
        assert torch.equal(torch.stack(list(layer.ratios()['var'].values())), _one_hot(0))
    # A soft layer holding hard logits: their gradients are exactly 0, so SGD with weight decay keeps
    # them finite and one-hot.
    optimizer = torch.optim.SGD(into_soft.parameters(), lr=0.5, weight_decay=0.1, momentum=0.9)
    into_soft.train()
    (into_soft(torch.randn(2, 4, 3, 3)) ** 2).sum().backward()
    assert torch.count_nonzero(into_soft.mean_weight.grad) == 0
    optimizer.step()
    assert torch.isfinite(into_soft.mean_weight).all()
    assert torch.equal(torch.stack(list(into_soft.ratios()['mean'].values())), _one_hot(1))


def test_hard_ratios_option_hardens_soft_checkpoints_on_load():
    soft = _trained_sn()
    layer = SwitchableNorm(4, hard_ratios=True)
    assert torch.equal(torch.stack(list(layer.ratios()['mean'].values())), _one_hot(0))  # before loading
    layer.load_state_dict(soft.state_dict())
    assert torch.equal(torch.stack(list(layer.ratios()['mean'].values())), _one_hot(1))
    assert torch.equal(torch.stack(list(layer.ratios()['var'].values())), _one_hot(0))
    assert [name for name, _ in layer.named_parameters()] == ['weight', 'bias']
    layer.reset_parameters()
    assert torch.equal(torch.stack(list(layer.ratios()['mean'].values())), _one_hot(0))


def test_hard_ratios_from_norm_cfg_tied_subset_and_sync():
    _, layer = build_norm_layer(dict(type='SN', hard_ratios=True, normalizers=('ln', 'bn'), tied=True), 8)
    assert layer.hard_ratios and layer.var_weight is None
    assert [name for name, _ in layer.named_parameters()] == ['weight', 'bias']
    layer.load_state_dict({**layer.state_dict(), 'mean_weight': torch.tensor([0.0, 3.0])})
    assert torch.equal(layer.ratios()['var']['bn'], torch.tensor(1.0))
    sync = SyncSwitchableNorm(4, hard_ratios=True)
    assert sync.hard_ratios and 'hard_ratios=True' in repr(sync)


def _set_logits(model):
    logits = {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, SwitchableNorm):
                module.mean_weight.copy_(torch.randn(3, generator=generator))
                module.var_weight.copy_(torch.randn(3, generator=generator))
                logits[name] = (int(module.mean_weight.argmax()), int(module.var_weight.argmax()))
    return logits


def test_hook_finetunes_with_the_loaded_models_argmax(tmp_path):
    from runner_helpers import TinySNModel, tiny_runner
    runner = tiny_runner(tmp_path, [dict(type='SNHardRatiosHook')], max_iters=3, val_interval=100)
    choices = _set_logits(runner.model)
    weight = runner.model.neck[1].weight.detach().clone()
    runner.train()
    for name, module in runner.model.named_modules():
        if isinstance(module, SwitchableNorm):
            assert module.hard_ratios
            assert torch.equal(torch.stack(list(module.ratios()['mean'].values())), _one_hot(choices[name][0]))
            assert torch.equal(torch.stack(list(module.ratios()['var'].values())), _one_hot(choices[name][1]))
    assert not torch.equal(runner.model.neck[1].weight, weight)
    runner.save_checkpoint(str(tmp_path), 'hard.pth')
    from mmengine.runner import load_checkpoint
    from norm_plugins.runner import mmengine_checkpoint_globals
    fresh = TinySNModel()
    with mmengine_checkpoint_globals():
        load_checkpoint(fresh, str(tmp_path / 'hard.pth'), map_location='cpu', strict=True)
    assert torch.equal(torch.stack(list(fresh.neck[1].ratios()['mean'].values())), _one_hot(choices['neck.1'][0]))


def test_hook_refuses_models_without_sn(tmp_path):
    from types import SimpleNamespace
    from norm_plugins.hooks import SNHardRatiosHook
    with pytest.raises(ValueError, match='has no SN layer'):
        SNHardRatiosHook().before_train(SimpleNamespace(model=torch.nn.Linear(2, 2)))


def _ddp_without_unused(rank, world_size):
    from types import SimpleNamespace
    from mmengine.model import MMDistributedDataParallel
    from norm_plugins.hooks import SNHardRatiosHook
    model = MMDistributedDataParallel(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), SwitchableNorm(2)))
    with pytest.raises(ValueError, match='find_unused_parameters'):
        SNHardRatiosHook().before_train(SimpleNamespace(model=model))


@pytest.mark.slow
def test_hook_explains_ddp_without_find_unused_parameters():
    from norm_plugins.testing import run_distributed
    run_distributed(_ddp_without_unused, 1)


def test_hard_ratios_norm_cfg_hardens_an_mmengine_checkpoint_load(tmp_path):
    from mmdet.models.backbones import ResNet
    from mmengine.optim import build_optim_wrapper
    from mmengine.runner import load_checkpoint
    soft = ResNet(depth=18, base_channels=4, norm_cfg=dict(type='SN'))
    choices = _set_logits(soft)
    torch.save({'state_dict': soft.state_dict()}, tmp_path / 'soft.pth')
    hard = ResNet(depth=18, base_channels=4, norm_cfg=dict(type='SN', hard_ratios=True))
    load_checkpoint(hard, str(tmp_path / 'soft.pth'), map_location='cpu', strict=True)
    for name, module in hard.named_modules():
        if isinstance(module, SwitchableNorm):
            assert torch.equal(torch.stack(list(module.ratios()['var'].values())), _one_hot(choices[name][1]))
    wrapper = build_optim_wrapper(hard, dict(optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4),
                                             constructor='NormAwareOptimWrapperConstructor',
                                             paramwise_cfg=dict(norm_decay_mult=0.0)))
    optimized = {id(p) for group in wrapper.param_groups for p in group['params']}
    assert {id(p) for p in hard.parameters()} <= optimized
    assert not {id(b) for n, b in hard.named_buffers() if n.endswith(('mean_weight', 'var_weight'))} & optimized
    assert not any(n.endswith(('mean_weight', 'var_weight')) for n, _ in hard.named_parameters())
