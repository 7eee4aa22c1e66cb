"""SSN under the field conditions: mmdet ResNet frozen stages, empty batches, with_cp=True, half
inputs and autocast, channels_last, torch.compile, and SN's hard-ratio hook on an SSN model."""
import copy
from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub, MMLogger
from torch import nn

import norm_plugins  # noqa: F401 - registers SSN
from norm_plugins.hooks import SNHardRatiosHook, SSNRadiusHook
from norm_plugins.layers import SparseSwitchableNorm, SyncSparseSwitchableNorm
from norm_plugins.ops.sparsestmax import vertex_distance
from test_checkpointing import _step
from test_sparse_switchable_norm import make_ssn, reference_of
from test_switchable_norm import sample


def ssn_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseSwitchableNorm)]


def randomize_logits(model, seed=0, scale=0.8):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ssn_layers(model):
            for logits in layer._mixture_logits().values():
                logits.copy_(torch.randn(logits.shape, generator=gen) * scale)
    return model


def resnet(**kwargs):
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    return randomize_logits(ResNet(depth=18, base_channels=8, norm_eval=False, **kwargs))


def test_frozen_stages_keep_their_ratios_radius_and_statistics():
    """mmdet ResNet frozen_stages=1: the stem and layer1 SSNs stay in eval with frozen logits; the hook
    drives the other layers only, which freeze at the vertex."""
    model = resnet(norm_cfg=dict(type='SSN'), frozen_stages=1)
    model.train()
    frozen = [model.norm1] + ssn_layers(model.layer1)
    assert frozen and all(not m.training and not m.mean_weight.requires_grad for m in frozen)
    before = [copy.deepcopy(m.state_dict()) for m in frozen]
    runner = SimpleNamespace(model=model, iter=9, max_iters=10, message_hub=MessageHub.get_current_instance())
    SSNRadiusHook().before_train(runner)
    SSNRadiusHook().before_train_iter(runner, 0)
    x = torch.randn(2, 3, 32, 32)
    sum(o.sum() for o in model(x)).backward()
    for layer, state in zip(frozen, before):
        for name, value in layer.state_dict().items():
            assert torch.equal(value, state[name]), name
        assert layer.mean_weight.grad is None
    trained = [m for m in ssn_layers(model) if m.training]
    assert len(trained) + len(frozen) == len(ssn_layers(model))
    for layer in trained:  # progress 0.9: past the vertex
        assert layer.mean_fixed_at.tolist() == layer.var_fixed_at.tolist() == [9]


@pytest.mark.parametrize('cls', [SparseSwitchableNorm, SyncSparseSwitchableNorm])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_empty_batch_changes_no_statistics(cls, momentum):
    layer = make_ssn(4, cls=cls, radius=0.5, momentum=momentum)
    layer(sample((3, 4, 5, 5)))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(0, 4, 5, 5, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_mmdet_resnet_with_cp_equals_the_plain_step():
    """with_cp=True (reentrant checkpoint, an inplace ReLU after it) at a radius where some vectors
    freeze in this step: gradients equal the plain step's, the recomputation freezes nothing twice
    and every buffer (running statistics, frozen choices and their iterations) matches."""
    plain = resnet(norm_cfg=dict(type='SSN', ratio_groups=2), with_cp=False)
    checkpointed = resnet(norm_cfg=dict(type='SSN', ratio_groups=2), with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        model.double().train()
        for layer in ssn_layers(model):
            layer.set_radius(0.6, iteration=5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads_out = [torch.randn(2, c, s, s, dtype=torch.float64) for c, s in ((8, 8), (16, 4), (32, 2), (64, 1))]
    plain_grads, plain_buffers = _step(plain, x, grads_out)
    cp_grads, cp_buffers = _step(checkpointed, x, grads_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cp_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    for name, buffer in plain_buffers.items():
        assert torch.equal(cp_buffers[name], buffer), name
    frozen_at = [b for n, b in cp_buffers.items() if n.endswith('fixed_at')]
    assert any((b == 5).any() for b in frozen_at) and any((b == -1).any() for b in frozen_at)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    layer = make_ssn(8, radius=0.4)
    x = (sample((2, 8, 6, 6)).clamp(-6, 6) * 5e3).to(dtype).requires_grad_()
    y = layer(x)
    y.backward(torch.randn(x.shape).to(dtype))
    assert y.dtype == x.grad.dtype == dtype and layer.mean_weight.grad.dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.double(), reference_of(layer, x.detach().float())[0], rtol=tol, atol=tol)


def test_autocast_keeps_the_input_dtype_and_float32_statistics():
    layer = make_ssn(8, radius=0.4)
    x = sample((2, 8, 6, 6)) * 1e4
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference_of(layer, x)[0], rtol=1e-4, atol=1e-4)


def test_half_model_radius_reaches_the_vertex():
    """``model.half()`` also casts the radius buffer; the vertex radius still gives one-hot ratios."""
    layer = make_ssn(4, radius=0.3).half()
    layer.set_radius(vertex_distance(3))
    layer(sample((2, 4, 3, 3)).half())
    assert layer.radius.dtype == torch.float16 and (layer.mean_fixed >= 0).all() and (layer.var_fixed >= 0).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_channels_last(dtype):
    layer = make_ssn(6, radius=0.5, ratio_groups=3)
    x = sample((2, 6, 4, 5)).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(x.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    y.backward(g)
    for t in (y, x.grad):
        assert t.dtype == dtype and t.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), reference_of(layer, x.detach())[0], rtol=tol, atol=tol)


def _compile_steps(backend):
    """Conv-SSN-ReLU-Conv-SyncSSN eager and compiled: two training steps (the second at the vertex,
    where every vector freezes inside the compiled forward, then with the host copy refreshed), an
    eval forward; outputs, gradients and buffers equal."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SparseSwitchableNorm(8, ratio_groups=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), SyncSparseSwitchableNorm(8, normalizers=('in', 'ln')))
    randomize_logits(eager)
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend=backend)
    for step, radius in enumerate((0.3, vertex_distance(3), vertex_distance(3), None)):
        x, g = torch.randn(2, 3, 5, 6), torch.randn(2, 8, 5, 6)
        results = []
        for model, layers in ((eager, ssn_layers(eager)), (compiled, ssn_layers(twin))):
            model.train(radius is not None)
            for layer in layers:
                if radius is not None:
                    layer.set_radius(radius * vertex_distance(len(layer.normalizers)) / vertex_distance(3),
                                     iteration=step)
                if step == 2:
                    layer._refresh_selection()
            model.zero_grad()
            xs = x.clone().requires_grad_()
            y = model(xs)
            y.backward(g)
            results.append([y, xs.grad, *(p.grad for p in model.parameters()), *(b.clone() for b in model.buffers())])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(layer._all_frozen for layer in ssn_layers(twin))
    assert any((layer.var_fixed_at == 1).any() for layer in ssn_layers(twin))  # froze in a compiled forward


def test_torch_compile_aot_eager():
    _compile_steps('aot_eager')


@pytest.mark.slow
def test_torch_compile_inductor():
    _compile_steps('inductor')


def test_sn_hard_ratios_hook_freezes_ssn_layers():
    from runner_helpers import TinySNModel
    model = TinySNModel()
    model.backbone[1] = make_ssn(4, radius=0.1)
    SNHardRatiosHook().before_train(SimpleNamespace(model=model, logger=MMLogger.get_current_instance()))
    layer = model.backbone[1]
    assert layer._all_frozen and layer.mean_fixed.tolist() == [int(layer.mean_weight.argmax())]
    assert layer.mean_weight.requires_grad
