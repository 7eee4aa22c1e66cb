"""Gradient checkpointing: a recomputed forward updates no statistics, and gradients equal the plain ones."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from norm_plugins import SwitchableNorm
from norm_plugins.ops.recompute import is_recomputing


class _Probe(torch.nn.Module):
    """Records is_recomputing() at every forward; x * x saves x, so the non-reentrant kind recomputes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(is_recomputing())
        return x * x


@pytest.mark.parametrize('use_reentrant', [True, False])
def test_is_recomputing_only_inside_the_checkpoint_backward(use_reentrant):
    probe = _Probe()
    x = torch.randn(3, requires_grad=True)
    checkpoint(probe, x, use_reentrant=use_reentrant).sum().backward()
    assert probe.calls == [False, True]


def test_plain_and_no_grad_forwards_are_not_recomputations():
    probe = _Probe()
    probe(torch.randn(3, requires_grad=True)).sum().backward()
    with torch.no_grad():
        probe(torch.randn(3))
    assert probe.calls == [False, False]


def _step(model, x, grads_out):
    """One training step's input-independent results: parameter gradients and buffers."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # mmdet calls checkpoint without use_reentrant
        outs = model(x)
    sum((o * g).sum() for o, g in zip(outs, grads_out)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    return grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize('norm, momentum', [('SN', None), ('SyncSN', 0.1)])
def test_mmdet_resnet_with_cp_equals_the_plain_step(norm, momentum):
    """mmdet ResNet-18 with_cp=True (reentrant checkpoint, then an inplace ReLU on its output): trains,
    gradients equal the plain step's, and every statistic moves once (num_batches_tracked == 1)."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    import norm_plugins  # noqa: F401 - registers SN

    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.manual_seed(0)
        cfg = dict(type='ResNet', depth=18, norm_cfg=dict(type=norm, momentum=momentum), norm_eval=False)
        plain = MODELS.build(dict(cfg, with_cp=False))
        checkpointed = MODELS.build(dict(cfg, with_cp=True))
    checkpointed.load_state_dict(plain.state_dict())
    # float64: the two steps sum the same terms in different orders, and 1e-6 should see only the norm.
    plain.double().train()  # mmdet's ResNet.train() returns None
    checkpointed.double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads_out = [torch.randn(2, c, s, s, dtype=torch.float64) for c, s in ((64, 8), (128, 4), (256, 2), (512, 1))]
    plain_grads, plain_buffers = _step(plain, x, grads_out)
    cp_grads, cp_buffers = _step(checkpointed, x, grads_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cp_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    for name, buffer in plain_buffers.items():
        assert torch.equal(cp_buffers[name], buffer), name
    assert all(int(b) == 1 for n, b in cp_buffers.items() if n.endswith('num_batches_tracked'))


@pytest.mark.parametrize('use_reentrant', [True, False])
def test_checkpointed_sn_block_equals_the_plain_step(use_reentrant):
    """torch.utils.checkpoint of both kinds on a Conv-SN-ReLU-Conv-SN block, an inplace ReLU after it."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SwitchableNorm(8, momentum=None), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 1), SwitchableNorm(8, unbiased_instance_var=True))
    twin = copy.deepcopy(block)
    x, grad_out = torch.randn(2, 3, 6, 5), torch.randn(2, 8, 6, 5)
    results = []
    for model, forward in ((block, lambda inp: model(inp)),
                           (twin, lambda inp: checkpoint(twin, inp, use_reentrant=use_reentrant))):
        xs = x.clone().requires_grad_()
        (torch.relu_(forward(xs)) * grad_out).sum().backward()
        results.append([xs.grad, *(p.grad for p in model.parameters()), *model.buffers()])
    for checkpointed, plain in zip(*results):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-6)
    assert int(twin[1].num_batches_tracked) == int(twin[4].num_batches_tracked) == 1


def test_no_grad_training_forwards_still_update():
    """Batch-average recomputation (PreciseStatsHook) and swa_utils.update_bn run training-mode forwards
    under no_grad: they are no checkpoint recomputation and must move the statistics."""
    layer = SwitchableNorm(4, momentum=None)
    with torch.no_grad():
        layer(torch.randn(2, 4, 3, 3) + 2)
    assert int(layer.num_batches_tracked) == 1 and layer.running_mean.abs().sum() > 0
