"""BCN against plain float64 formulas (Eq. 40-42, Algorithm 1), gradcheck, state, errors, gloo runs."""
import copy
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from norm_plugins import BatchChannelNorm
from norm_plugins.ops import batch_channel_norm_fn
from norm_plugins.testing import run_distributed

EPS = 1e-5


def reference_bcn(x, mean, var, weight, bias, group_weight, group_bias, groups, eps=EPS):
    """Eq. 40 then Eq. 42, written out per channel and per (sample, group) with plain float64 ops."""
    n, c = x.shape[:2]
    per_group = c // groups
    out = torch.empty_like(x, dtype=torch.float64)
    for ch in range(c):
        out[:, ch] = (x[:, ch].double() - mean[ch]) / torch.sqrt(var[ch] + eps) * weight[ch] + bias[ch]
    y = torch.empty_like(out)
    for s in range(n):
        for g in range(groups):
            block = out[s, g * per_group:(g + 1) * per_group]
            mu = block.sum() / block.numel()
            sigma2 = ((block - mu) ** 2).sum() / block.numel()
            y[s, g * per_group:(g + 1) * per_group] = ((block - mu) / torch.sqrt(sigma2 + eps) * group_weight[g]
                                                       + group_bias[g])
    return y


def batch_moments(x):
    """Per-channel mean and biased variance over (N, *spatial), float64."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.sum(1) / flat.shape[1]
    return mean, ((flat - mean[:, None]) ** 2).sum(1) / flat.shape[1]


def randomize_affine(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scale in (layer.weight, layer.group_weight):
            scale.copy_(1 + 0.5 * torch.randn(scale.shape, generator=gen, dtype=torch.float64))
        for shift in (layer.bias, layer.group_bias):
            shift.copy_(0.5 * torch.randn(shift.shape, generator=gen, dtype=torch.float64))


def affine_of(layer):
    return (layer.weight.detach().double(), layer.bias.detach().double(), layer.group_weight.detach().double(),
            layer.group_bias.detach().double())


@pytest.mark.parametrize('shape', [(4, 8, 5), (3, 8, 4, 5), (2, 8, 3, 2, 3)])
def test_large_batch_matches_reference_in_train_and_eval(shape):
    torch.manual_seed(0)
    layer = BatchChannelNorm(8, num_groups=4, momentum=0.3).double()
    randomize_affine(layer)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    mean, var = batch_moments(x)
    y = layer(x)
    torch.testing.assert_close(y, reference_bcn(x, mean, var, *affine_of(layer), 4))
    count = x.numel() // 8
    torch.testing.assert_close(layer.running_mean, 0.3 * mean)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * var * count / (count - 1))

    layer.eval()
    x2 = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x2), reference_bcn(x2, layer.running_mean, layer.running_var,
                                                        *affine_of(layer), 4))


def test_large_batch_cumulative_momentum_and_no_running_stats():
    torch.manual_seed(0)
    layer = BatchChannelNorm(4, num_groups=2, momentum=None).double()
    xs = [torch.randn(3, 4, 5, dtype=torch.float64) + i for i in range(3)]
    for x in xs:
        layer(x)
    unbiased = [batch_moments(x)[1] * 15 / 14 for x in xs]
    torch.testing.assert_close(layer.running_mean, sum(batch_moments(x)[0] for x in xs) / 3)
    torch.testing.assert_close(layer.running_var, sum(unbiased) / 3)
    assert int(layer.num_batches_tracked) == 3

    untracked = BatchChannelNorm(4, num_groups=2, track_running_stats=False).double().eval()
    x = xs[0]
    torch.testing.assert_close(untracked(x), reference_bcn(x, *batch_moments(x), *affine_of(untracked), 2))
    assert 'running_mean' not in untracked.state_dict()


def reference_algorithm1(batches, rate, channels):
    """Algorithm 1, steps 1-4, in float64: returns the estimates after every step."""
    est_mean = torch.zeros(channels, dtype=torch.float64)
    est_var = torch.ones(channels, dtype=torch.float64)
    history = []
    for x in batches:
        flat = x.double().transpose(0, 1).reshape(channels, -1)
        batch_mean = flat.mean(1)
        sq_distance = ((flat - est_mean[:, None]) ** 2).mean(1)  # from the *previous* estimate
        est_mean = est_mean + rate * (batch_mean - est_mean)
        est_var = est_var + rate * (sq_distance - est_var)
        history.append((est_mean.clone(), est_var.clone()))
    return history


def test_micro_batch_matches_reference_over_steps_with_gradients():
    torch.manual_seed(0)
    layer = BatchChannelNorm(8, num_groups=2, estimate=True, update_rate=0.1).double()
    randomize_affine(layer, seed=1)
    batches = [torch.randn(n, 8, 3, 4, dtype=torch.float64) * 3 + 2 for n in (2, 1, 3, 1)]
    expected = reference_algorithm1(batches, 0.1, 8)
    for x, (est_mean, est_var) in zip(batches, expected):
        x = x.requires_grad_()
        grad_out = torch.randn_like(x)
        layer.zero_grad()
        y = layer(x)
        torch.testing.assert_close(layer.estimated_mean, est_mean)
        torch.testing.assert_close(layer.estimated_var, est_var)
        # The updated estimates normalize this step, and are constants for the gradient.
        params = [p.detach().clone().requires_grad_() for p in affine_of(layer)]
        x_ref = x.detach().clone().requires_grad_()
        y_ref = reference_bcn(x_ref, est_mean, est_var, *params, 2)
        torch.testing.assert_close(y, y_ref)
        (y * grad_out).sum().backward()
        (y_ref * grad_out).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        for p, p_ref in zip((layer.weight, layer.bias, layer.group_weight, layer.group_bias), params):
            torch.testing.assert_close(p.grad, p_ref.grad)


def test_algorithm1_hand_computed_sequence():
    layer = BatchChannelNorm(2, num_groups=1, estimate=True, update_rate=0.5)
    # Channel 0 sees 2, then 4, then {0, 2}; channel 1 stays at 0.
    steps = [torch.tensor([[[2.0, 2.0]], [[2.0, 2.0]]]), torch.tensor([[[4.0, 4.0]], [[4.0, 4.0]]]),
             torch.tensor([[[0.0, 2.0]], [[2.0, 0.0]]])]
    # m = batch mean, s = mean (x - previous estimate)^2, new = old + 0.5 (batch - old):
    #   step 1: m 2, s (2-0)^2 = 4            -> mean 1,   var 1 + 0.5 (4 - 1) = 2.5
    #   step 2: m 4, s (4-1)^2 = 9            -> mean 2.5, var 2.5 + 0.5 (9 - 2.5) = 5.75
    #   step 3: m 1, s (6.25 + 0.25) / 2 = 3.25 -> mean 1.75, var 5.75 + 0.5 (3.25 - 5.75) = 4.5
    # Channel 1 (all zeros): mean stays 0, var 1 -> 0.5 -> 0.25 -> 0.125.
    expected = [((1.0, 0.0), (2.5, 0.5)), ((2.5, 0.0), (5.75, 0.25)), ((1.75, 0.0), (4.5, 0.125))]
    for ch0, (mean, var) in zip(steps, expected):
        x = torch.cat([ch0, torch.zeros_like(ch0)], dim=1)
        layer(x)
        torch.testing.assert_close(layer.estimated_mean, torch.tensor(mean))
        torch.testing.assert_close(layer.estimated_var, torch.tensor(var))


def test_micro_batch_eval_uses_estimates_without_updating():
    torch.manual_seed(0)
    layer = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.3).double()
    randomize_affine(layer)
    layer(torch.randn(2, 4, 3, 3, dtype=torch.float64) + 1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64) * 5
    y = layer(x)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    expected = reference_bcn(x, layer.estimated_mean, layer.estimated_var, *affine_of(layer), 2)
    torch.testing.assert_close(y, expected)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    large = BatchChannelNorm(4, num_groups=2).double()
    randomize_affine(large)
    params = (large.weight, large.bias, large.group_weight, large.group_bias)
    assert torch.autograd.gradcheck(lambda x, *p: large(x), (x,) + params)

    micro = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.5).double()
    randomize_affine(micro)
    micro(x.detach() * 2 + 1)  # move the estimates away from (0, 1)
    micro.set_update_rate(0)  # training step whose estimates stay put, so the function is fixed
    params = (micro.weight, micro.bias, micro.group_weight, micro.group_bias)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert torch.autograd.gradcheck(lambda x, *p: micro(x), (x,) + params)
    micro.eval()
    assert torch.autograd.gradcheck(lambda x, *p: micro(x), (x,) + params)


@pytest.mark.parametrize('estimate', [False, True])
def test_without_affine(estimate):
    torch.manual_seed(0)
    layer = BatchChannelNorm(6, num_groups=3, affine=False, estimate=estimate, update_rate=0.5).double()
    assert list(layer.parameters()) == []
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True) * 2 + 1
    y = layer(x)
    stats = (layer.estimated_mean, layer.estimated_var) if estimate else batch_moments(x.detach())
    ones, zeros = torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(y, reference_bcn(x.detach(), *stats, ones, zeros, ones[:3], zeros[:3], 3))
    layer.eval()
    assert torch.autograd.gradcheck(layer, (x.detach().requires_grad_(),))


@pytest.mark.parametrize('estimate', [False, True])
def test_parameter_gradients_without_input_gradient(estimate):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    grads = []
    for needs_input_grad in (True, False):
        layer = BatchChannelNorm(4, num_groups=2, estimate=estimate, update_rate=0.3).double()
        randomize_affine(layer)
        (layer(x.clone().requires_grad_(needs_input_grad)) * x).sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for with_x, without_x in zip(*grads):
        torch.testing.assert_close(without_x, with_x)


def test_zero_update_rate_warns_once():
    layer = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.0)
    x = torch.randn(2, 4, 3)
    with pytest.warns(UserWarning, match='update_rate 0') as record:
        layer(x)
        layer(x)
    assert len([w for w in record if 'update_rate 0' in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.01)(x)
        layer.eval()
        layer(x)  # eval never updates: nothing to warn about
    # r is checked where it is set: by construction (above), set_update_rate and loading.
    loaded = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.01)
    loaded.load_state_dict(layer.state_dict())
    with pytest.warns(UserWarning, match='update_rate 0'):
        loaded(x)
    loaded.set_update_rate(0.1)
    loaded.set_update_rate(0.0)
    with pytest.warns(UserWarning, match='update_rate 0'):
        loaded(x)
    loaded.set_update_rate(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loaded(x)


def test_state_dict_round_trip_keeps_estimates_and_rate():
    torch.manual_seed(0)
    layer = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.25)
    randomize_affine(layer)
    for _ in range(3):
        layer(torch.randn(2, 4, 3, 3) * 2 + 1)
    state = layer.state_dict()
    assert set(state) == {'weight', 'bias', 'group_weight', 'group_bias', 'estimated_mean', 'estimated_var',
                          'update_rate'}
    restored = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.9)
    restored.load_state_dict(state)
    assert float(restored.update_rate) == 0.25
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[k], v, rtol=0, atol=0)
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(restored(x), layer(x))  # next training step identical too
    torch.testing.assert_close(restored.estimated_var, layer.estimated_var)

    large = BatchChannelNorm(4, num_groups=2)
    large(torch.randn(3, 4, 5) * 3 + 2)
    assert set(large.state_dict()) == {'weight', 'bias', 'group_weight', 'group_bias', 'running_mean',
                                       'running_var', 'num_batches_tracked'}


def test_estimates_from_large_batch_statistics():
    torch.manual_seed(0)
    large = BatchChannelNorm(4, num_groups=2)
    randomize_affine(large)
    for _ in range(2):
        large(torch.randn(3, 4, 5) * 3 + 2)
    micro = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.1)
    micro.load_state_dict(large.state_dict())  # strict: running statistics become the estimates
    torch.testing.assert_close(micro.estimated_mean, large.running_mean)
    torch.testing.assert_close(micro.estimated_var, large.running_var)
    assert float(micro.update_rate) == pytest.approx(0.1)
    large.eval()
    micro.eval()
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(micro(x), large(x))

    bn = nn.BatchNorm1d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    fresh = BatchChannelNorm(4, num_groups=2, estimate=True)
    fresh.init_estimates_from(bn)
    torch.testing.assert_close(fresh.estimated_mean, bn.running_mean)
    torch.testing.assert_close(fresh.estimated_var, bn.running_var)
    with pytest.raises(ValueError, match='no running statistics'):
        fresh.init_estimates_from(nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match='channels'):
        fresh.init_estimates_from(nn.BatchNorm1d(6))
    with pytest.raises(RuntimeError, match='estimate=True'):
        large.init_estimates_from(bn)


def reference_gradients(layer, x, grad_out, stats=None):
    """Output and gradients (x, then the four affine parameters) by autograd through the float64
    reference; ``stats``: constant (mean, var), else the batch moments of x (with their gradients)."""
    x_ref = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in affine_of(layer)]
    mean, var = batch_moments(x_ref) if stats is None else (s.detach().double() for s in stats)
    y = reference_bcn(x_ref, mean, var, *params, layer.num_groups)
    (y * grad_out.double()).sum().backward()
    return y.detach(), x_ref.grad, [p.grad for p in params]


def assert_matches_reference(layer, x, y, grad_out, stats=None, rtol=1e-5, atol=1e-5, grad_rtol=None):
    """y, x.grad and the parameter gradients of ``layer`` against :func:`reference_gradients`."""
    y_ref, dx_ref, dparams_ref = reference_gradients(layer, x, grad_out, stats)
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=rtol, atol=atol)
    for param, expected in zip((layer.weight, layer.bias, layer.group_weight, layer.group_bias), dparams_ref):
        torch.testing.assert_close(param.grad.double(), expected, rtol=grad_rtol or rtol, atol=atol)


def test_one_by_one_maps_match_reference_gradients():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 1, 1, requires_grad=True)
    micro = BatchChannelNorm(8, num_groups=8, estimate=True)
    randomize_affine(micro)
    y = micro(x)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    # One value per group: the group normalization maps it to 0, leaving the group bias; the
    # gradient is 0 up to float32 rounding of terms scaled by 1/sqrt(eps).
    torch.testing.assert_close(y, micro.group_bias.detach().view(1, 8, 1, 1), rtol=0, atol=1e-4)
    assert_matches_reference(micro, x, y, grad_out, stats=(micro.estimated_mean, micro.estimated_var),
                             atol=1e-4)

    large = BatchChannelNorm(8, num_groups=4)
    randomize_affine(large)
    x2 = torch.randn(2, 8, 1, 1, requires_grad=True)
    y2 = large(x2)
    grad_out2 = torch.randn_like(y2)
    (y2 * grad_out2).sum().backward()
    # Two values per channel, two channels per group: 1/sqrt(var + eps) is large, so is the gradient.
    assert_matches_reference(large, x2, y2, grad_out2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='more than one value per channel'):
        large(torch.randn(1, 8, 1, 1))
    large.eval()
    large.zero_grad()
    x3 = torch.randn(1, 8, 1, 1, requires_grad=True)
    y3 = large(x3)
    (y3 * grad_out).sum().backward()
    assert_matches_reference(large, x3, y3, grad_out, stats=(large.running_mean, large.running_var))


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize('estimate', [False, True])
def test_half_inputs_match_float64_reference_gradients(dtype, tol, estimate):
    """float32 parameters, half input: statistics and coefficients in float32 or better, y and dx
    rounded to the input dtype once; parameter gradients at float32 accuracy."""
    torch.manual_seed(0)
    layer = BatchChannelNorm(8, num_groups=4, estimate=estimate, update_rate=0.5)
    randomize_affine(layer)
    x = (torch.randn(2, 8, 5, 6) * 3 + 2).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    grad_out = torch.randn(y.shape).to(dtype)
    (y * grad_out).sum().backward()
    assert x.grad.dtype == dtype
    stats = (layer.estimated_mean, layer.estimated_var) if estimate else None
    # y and dx: one rounding to the half dtype (relative ``tol``) of values of size up to ~3.
    assert_matches_reference(layer, x, y, grad_out, stats, rtol=tol, atol=3 * tol, grad_rtol=1e-4)


def test_autocast_keeps_float32_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4) * 4 + 3
    for estimate in (False, True):
        ref = BatchChannelNorm(8, num_groups=4, estimate=estimate, update_rate=0.5)
        amp = BatchChannelNorm(8, num_groups=4, estimate=estimate, update_rate=0.5)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = amp(x.bfloat16())
        assert y.dtype == torch.bfloat16
        buffers = ('estimated_mean', 'estimated_var') if estimate else ('running_mean', 'running_var')
        expected = ref(x.bfloat16().float())
        for name in buffers:
            assert getattr(amp, name).dtype == torch.float32
            torch.testing.assert_close(getattr(amp, name), getattr(ref, name))
        torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize('estimate', [False, True])
def test_empty_batch_returns_empty_output_and_changes_nothing(estimate):
    layer = BatchChannelNorm(8, num_groups=4, estimate=estimate, update_rate=0.5, momentum=None)
    randomize_affine(layer)
    layer(torch.randn(3, 8, 2, 2) + 1)  # statistics away from their initial values
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for param in layer.parameters():
        assert torch.equal(param.grad, torch.zeros_like(param))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key  # bit-identical, num_batches_tracked included
    layer.eval()
    assert layer(x).shape == x.shape


class _HostSyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every ``float(t)``, ``t.item()`` and ``if t`` of a tensor,
    each a host-device synchronization on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('config', [dict(), dict(momentum=None), dict(estimate=True, update_rate=0.1),
                                    dict(estimate=True, update_rate=0.0)])
def test_forward_and_backward_without_host_syncs(config):
    layer = BatchChannelNorm(8, num_groups=4, **config)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # update_rate 0 warns (from the host value set at construction)
        with _HostSyncCounter() as counter:
            for _ in range(2):
                layer(x).square().sum().backward()
            layer(x[:0]).sum().backward()
            layer.eval()
            layer(x).sum().backward()
    assert counter.count == 0


def large_offset_errors(make, estimate=False):
    """Relative errors (norm of the error / norm of the float64 result on the same float32 data) of
    the output and the input gradient of the layer ``make()`` at mean / std = 1e4. Micro batch: BCN
    normalizes with estimates equal to the data's batch statistics, in eval."""
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 16, 16, dtype=torch.float64) + 1e4).float()
    grad_out = torch.randn(x.shape)
    results = []
    for dtype in (torch.float32, torch.float64):
        layer = make().to(dtype)
        if isinstance(layer, BatchChannelNorm) and estimate:
            for buffer, value in zip((layer.estimated_mean, layer.estimated_var), batch_moments(x)):
                buffer.copy_(value)
            layer.eval()
        xs = x.to(dtype, copy=True).requires_grad_()
        y = layer(xs)
        (y * grad_out.to(dtype)).sum().backward()
        results.append((y.detach().double(), xs.grad.double()))
    (y32, dx32), (y64, dx64) = results
    return (y32 - y64).norm() / y64.norm(), (dx32 - dx64).norm() / dx64.norm()


@pytest.mark.parametrize('estimate', [False, True])
def test_large_offset_error_within_twice_batchnorm(estimate):
    """Output and input-gradient errors at mean / std = 1e4 within 2x of torch BatchNorm's (training
    mode): the centred form loses no more than BatchNorm does."""
    bcn = large_offset_errors(lambda: BatchChannelNorm(64, num_groups=32, estimate=estimate), estimate)
    bn = large_offset_errors(lambda: nn.BatchNorm2d(64))
    assert bcn[0] <= 2 * bn[0] and bcn[1] <= 2 * bn[1], (bcn, bn)


def test_channels_last_half_input_saves_only_x_and_keeps_layout():
    torch.manual_seed(0)
    layer = BatchChannelNorm(8, num_groups=4)
    x = torch.randn(2, 8, 5, 6).bfloat16().to(memory_format=torch.channels_last).requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    # x itself (no float32 copy, no NCHW copy), and besides it only the affine parameters.
    assert saved[0].data_ptr() == x.data_ptr() and saved[0].dtype == torch.bfloat16
    assert all(any(t is p for p in layer.parameters()) for t in saved[1:]), [t.shape for t in saved]
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert not y._is_view()
    grad_out = torch.randn(y.shape).bfloat16().to(memory_format=torch.channels_last)
    y.backward(grad_out)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    reference = BatchChannelNorm(8, num_groups=4)
    x_plain = x.detach().contiguous().requires_grad_()
    y_plain = reference(x_plain)
    y_plain.backward(grad_out.contiguous())
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=0, atol=0)


@pytest.mark.parametrize('needs_input_grad', [False, True])
def test_input_gradient_pass_only_when_x_needs_it(needs_input_grad, monkeypatch):
    calls = []
    original = batch_channel_norm_fn.row_normalize_backward

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(batch_channel_norm_fn, 'row_normalize_backward', counted)
    layer = BatchChannelNorm(8, num_groups=4)
    x = torch.randn(2, 8, 3, requires_grad=needs_input_grad)
    layer(x).square().sum().backward()
    assert len(calls) == int(needs_input_grad)
    assert layer.weight.grad is not None


@pytest.mark.parametrize('estimate', [False, True])
def test_double_backward_raises(estimate):
    layer = BatchChannelNorm(4, num_groups=2, estimate=estimate).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    # A linear loss too: once_differentiable would give d(dx)/dx = 0 there without a word.
    for loss in (layer(x).square().sum(), (layer(x) * torch.randn_like(x)).sum()):
        with pytest.raises(RuntimeError, match='BatchChannelNormFunction: second derivatives are not implemented'):
            torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """torch.compile over both modes: same outputs, gradients and statistics as eager, over two
    training steps. The aot_eager backend traces the layer as inductor (mmengine's compile=True)
    does, dynamo and AOT autograd through the custom Function, without its minute of C++ codegen."""
    torch.manual_seed(0)
    model = nn.Sequential(BatchChannelNorm(8, num_groups=4), nn.ReLU(inplace=True),
                          BatchChannelNorm(8, num_groups=2, estimate=True, update_rate=0.3))
    for layer in model:
        if isinstance(layer, BatchChannelNorm):
            randomize_affine(layer)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend='aot_eager')
    for step in range(2):
        x = torch.randn(2, 8, 5, 5) * (step + 1) + 1
        outputs = []
        for module in (compiled, eager):
            xs = x.clone().requires_grad_()
            y = module(xs)
            y.square().sum().backward()
            outputs.append((y, xs.grad))
        torch.testing.assert_close(*[o[0] for o in outputs])
        torch.testing.assert_close(*[o[1] for o in outputs])
    for got, expected in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(got, expected)
    # Sums of O(1) terms in another order: absolute float32 noise on gradients of order 1e-3.
    for got, expected in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-4)


def test_layer_shared_within_one_forward():
    """A head shared across feature levels runs the layer twice before backward."""
    layer = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.5)
    a, b = torch.randn(1, 4, 3, requires_grad=True), torch.randn(1, 4, 5, requires_grad=True)
    (layer(a).square().sum() + layer(b).square().sum()).backward()
    assert a.grad is not None and torch.isfinite(b.grad).all()


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match='does not divide num_features=24'):
        BatchChannelNorm(24)
    with pytest.raises(ValueError, match=r'update_rate must be a number in \[0, 1\]'):
        BatchChannelNorm(32, estimate=True, update_rate=1.5)
    with pytest.raises(ValueError, match=r'update_rate must be a number in \[0, 1\]'):
        BatchChannelNorm(32, estimate=True, update_rate=-0.1)
    with pytest.raises(ValueError, match=r'update_rate must be a number in \[0, 1\]'):
        BatchChannelNorm(32, estimate=True).set_update_rate(2.0)
    with pytest.raises(RuntimeError, match='only estimate=True'):
        BatchChannelNorm(32).set_update_rate(0.1)
    with pytest.raises(TypeError, match='unexpected keyword'):
        BatchChannelNorm(32, num_group=8)
    with pytest.raises(ValueError, match='estimate must be True'):
        BatchChannelNorm(32, estimate='micro')
    with pytest.raises(ValueError, match='sync must be'):
        BatchChannelNorm(32, sync='yes')
    with pytest.raises(ValueError, match='momentum'):
        BatchChannelNorm(32, momentum=2)
    with pytest.raises(ValueError, match='eps must be > 0'):
        BatchChannelNorm(32, eps=0)
    with pytest.raises(ValueError, match='group_size'):
        BatchChannelNorm(32, group_size=0)
    layer = BatchChannelNorm(8, num_groups=4)
    with pytest.raises(ValueError, match=r'expects an \(N, C, L\)'):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match='built for 8 channels but the input has 6'):
        layer(torch.randn(2, 6, 3))


# --------------------------------------------------------------------------- distributed (gloo)

def _distributed_worker(rank, world_size, sizes, out_dir):
    torch.manual_seed(0)
    total = sum(sizes)
    data = torch.randn(total, 8, 3, 2, dtype=torch.float64) * 2 + 1
    grad_out = torch.randn_like(data)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    result = {}

    micro = BatchChannelNorm(8, num_groups=4, estimate=True, update_rate=0.2).double()
    for step in range(3):
        micro(data[local] * (step + 1))
    result['estimates'] = (micro.estimated_mean.clone(), micro.estimated_var.clone())

    large = BatchChannelNorm(8, num_groups=4, sync=True).double()
    randomize_affine(large)
    x = data[local].clone().requires_grad_()
    y = large(x)
    (y * grad_out[local]).sum().backward()
    result['large'] = (y.detach(), x.grad, [p.grad for p in large.parameters()], large.running_mean.clone(),
                       large.running_var.clone())
    result.update(_empty_global_batch(rank))
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))


def _empty_global_batch(rank):
    """Synchronized BCN on a global batch empty, or of one value per channel: nothing changes; and no
    host synchronization in any synchronized forward or backward."""
    torch.manual_seed(rank)
    result, counter = {}, _HostSyncCounter()

    def unchanged(layer, state):
        return all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())

    for estimate in (False, True):
        layer = BatchChannelNorm(8, num_groups=4, estimate=estimate, sync=True, update_rate=0.5,
                                 momentum=None).double()
        x = torch.randn(0, 8, 3, dtype=torch.float64, requires_grad=True)
        with counter:
            layer(torch.randn(3, 8, 2, dtype=torch.float64) + 1).sum().backward()
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        with counter:
            y = layer(x)
            y.sum().backward()
        result[f'empty, estimate={estimate}'] = (tuple(y.shape), unchanged(layer, state))
    # One value per channel over all ranks (rank 0 holds a 1x1 sample, the others nothing): no
    # unbiased variance, so the running statistics and num_batches_tracked stay as they are.
    layer = BatchChannelNorm(8, num_groups=4, sync=True)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(int(rank == 0), 8, 1, 1, requires_grad=True)
    with counter:
        y = layer(x)
        (y * torch.randn_like(y)).sum().backward()
    result['single value'] = (bool(torch.isfinite(x.grad).all()), unchanged(layer, state))
    result['host syncs'] = counter.count
    return result


@pytest.mark.slow
@pytest.mark.parametrize('sizes', [(1, 3), (2, 0, 3)])
def test_distributed_estimates_identical_and_sync_matches_concatenated_batch(sizes, tmp_path):
    run_distributed(_distributed_worker, len(sizes), sizes, str(tmp_path))
    check_distributed_results(tmp_path, sizes)


def check_distributed_results(tmp_path, sizes):
    """The ranks' results of :func:`_distributed_worker` against one process on the whole batch
    (this process's backend)."""
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(len(sizes))]

    torch.manual_seed(0)
    data = torch.randn(sum(sizes), 8, 3, 2, dtype=torch.float64) * 2 + 1
    grad_out = torch.randn_like(data)
    steps = reference_algorithm1([data * (s + 1) for s in range(3)], 0.2, 8)
    for res in results:
        torch.testing.assert_close(res['estimates'][0], steps[-1][0])
        torch.testing.assert_close(res['estimates'][1], steps[-1][1])
        torch.testing.assert_close(res['estimates'][0], results[0]['estimates'][0], rtol=0, atol=0)
        torch.testing.assert_close(res['estimates'][1], results[0]['estimates'][1], rtol=0, atol=0)

    single = BatchChannelNorm(8, num_groups=4).double()
    randomize_affine(single)
    x = data.clone().requires_grad_()
    y = single(x)
    (y * grad_out).sum().backward()
    torch.testing.assert_close(torch.cat([r['large'][0] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r['large'][1] for r in results]), x.grad)
    for i, p in enumerate(single.parameters()):
        torch.testing.assert_close(sum(r['large'][2][i] for r in results), p.grad)
    for res in results:
        torch.testing.assert_close(res['large'][3], single.running_mean)
        torch.testing.assert_close(res['large'][4], single.running_var)
    for res in results:  # see _empty_global_batch
        assert res['empty, estimate=False'] == ((0, 8, 3), True) and res['empty, estimate=True'] == ((0, 8, 3), True)
        assert res['single value'] == (True, True)
        assert res['host syncs'] == 0
