"""BCN under gradient checkpointing: the recomputed forward updates nothing and normalizes with the
constants of the original forward, so gradients and statistics equal those of a plain step."""
import copy
import warnings

import pytest
import torch
from mmdet.registry import MODELS as DET_MODELS
from mmengine.registry import DefaultScope
from torch import nn
from torch.utils.checkpoint import checkpoint

from norm_plugins import BatchChannelNorm


def _step(model, x, grad_out, forward):
    """One forward/backward; returns the input gradient, the parameter gradients and the buffers."""
    x = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # mmdet calls checkpoint without use_reentrant
        out = forward(model, x)
    (out * grad_out).sum().backward()
    return (x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in model.named_buffers()})


def _assert_same_step(plain, checkpointed):
    (dx, grads, buffers), (dx_cp, grads_cp, buffers_cp) = plain, checkpointed
    torch.testing.assert_close(dx_cp, dx, rtol=1e-6, atol=1e-6)
    assert grads_cp.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_cp[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    for name, buffer in buffers.items():  # statistics and estimates updated exactly once
        assert torch.equal(buffers_cp[name], buffer), name


def _block(estimate):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), BatchChannelNorm(8, num_groups=4, estimate=estimate,
                                                                          update_rate=0.3),
                         nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1), BatchChannelNorm(8, num_groups=2))


@pytest.mark.parametrize('use_reentrant', [True, False])
@pytest.mark.parametrize('estimate', [False, True])
def test_checkpointed_block_equals_plain_step(estimate, use_reentrant):
    block = _block(estimate)
    x, grad_out = torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 5)
    plain = _step(copy.deepcopy(block), x, grad_out, lambda m, x: torch.relu_(m(x)))
    # An inplace ReLU on the checkpoint's output, as mmdet's blocks apply after it.
    checkpointed = _step(block, x, grad_out,
                         lambda m, x: torch.relu_(checkpoint(m, x, use_reentrant=use_reentrant)))
    _assert_same_step(plain, checkpointed)
    if not estimate:
        assert int(block[1].num_batches_tracked) == 1


def test_layer_used_twice_per_step():
    """A shared micro-batch layer (a head over several levels) run twice in one step: the non-reentrant
    kind keeps each forward's constants, the reentrant kind cannot tell them apart and says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.5))
    x = torch.randn(2, 4, 3, 3)
    grad_out = torch.randn(2, 4, 3, 3)

    def twice(wrap):
        return lambda m, x: wrap(m, x) + 2 * wrap(m, x * 3 + 1)

    plain = _step(copy.deepcopy(model), x, grad_out, twice(lambda m, x: m(x)))
    non_reentrant = copy.deepcopy(model)
    _assert_same_step(plain, _step(non_reentrant, x, grad_out,
                                   twice(lambda m, x: checkpoint(m, x, use_reentrant=False))))
    with pytest.raises(RuntimeError, match='separate layer for each use'):
        _step(copy.deepcopy(model), x, grad_out, twice(lambda m, x: checkpoint(m, x, use_reentrant=True)))


@pytest.mark.parametrize('estimate', [False, True])
def test_training_forward_under_no_grad_updates(estimate):
    """Batch-average recomputation (PreciseStatsHook) runs training forwards under no_grad."""
    layer = BatchChannelNorm(4, num_groups=2, estimate=estimate, update_rate=0.5)
    with torch.no_grad():
        layer(torch.randn(3, 4, 5) + 2)
    buffers = ('estimated_mean', 'estimated_var') if estimate else ('running_mean', 'running_var')
    assert not torch.equal(getattr(layer, buffers[0]), torch.zeros(4))
    assert not torch.equal(getattr(layer, buffers[1]), torch.ones(4))
    if not estimate:
        assert int(layer.num_batches_tracked) == 1


@pytest.mark.slow
@pytest.mark.parametrize('estimate,batch', [(False, 2), (True, 1)])
def test_mmdet_resnet18_with_cp_equals_plain(estimate, batch):
    """mmdet's ResNet(with_cp=True) checkpoints every block (reentrant, its default) and applies an
    inplace ReLU to the checkpoint's output."""
    backbones = []
    for with_cp in (False, True):
        with DefaultScope.overwrite_default_scope('mmdet'):
            backbones.append(DET_MODELS.build(dict(
                type='ResNet', depth=18, conv_cfg=dict(type='WSConv'), with_cp=with_cp,
                norm_cfg=dict(type='BCN', estimate=estimate, requires_grad=True), norm_eval=False,
                out_indices=(0, 1, 2, 3))))
    torch.manual_seed(0)
    backbones[0].init_weights()
    backbones[1].load_state_dict(backbones[0].state_dict())
    for backbone in backbones:
        backbone.train()
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 32, 32)
    grads_out = [torch.randn(batch, c, 32 // s, 32 // s) for c, s in ((64, 4), (128, 8), (256, 16), (512, 32))]

    def forward(model, x):
        return sum((out * g).sum() for out, g in zip(model(x), grads_out))

    plain, checkpointed = (_step(backbone, x, torch.ones(()), forward) for backbone in backbones)
    _assert_same_step(plain, checkpointed)
    norms = [m for m in backbones[1].modules() if isinstance(m, BatchChannelNorm)]
    if estimate:  # Algorithm 1 moved every estimate, once
        assert all(not torch.equal(m.estimated_var, torch.ones_like(m.estimated_var)) for m in norms)
    else:
        assert all(int(m.num_batches_tracked) == 1 for m in norms)
