"""SN against an independent float64 transcription of the SN paper's Eq. 2-5."""
import copy
import itertools

import pytest
import torch

from norm_plugins import SwitchableNorm
from norm_plugins.layers.switchable_norm import NORMALIZERS

SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(NORMALIZERS, r)]
SHAPES = {1: (3, 6, 7), 2: (3, 6, 4, 5), 3: (2, 6, 3, 2, 4)}


def reference_sn(x, mean_ratios, var_ratios, weight, bias, eps, unbiased=False,
                 running=None):
    """Eq. 2-5 computed directly from x in float64: each statistic over its own set of pixels.

    ``unbiased`` follows the authors' released code: the instance variance divides by L - 1
    (0 when L == 1) and LN/BN variances are E[var_in + mu_in^2] - mu^2 over c or n.
    ``running`` = (mean, var) replaces the batch statistics (eval mode).
    """
    shape = x.shape
    n, c = shape[:2]
    x = x.double().reshape(n, c, -1)
    spatial = x.shape[2]
    mu = {'in': x.mean(2, keepdim=True), 'ln': x.mean((1, 2), keepdim=True),
          'bn': x.mean((0, 2), keepdim=True)}
    if unbiased:
        var_in = x.var(2, keepdim=True) if spatial > 1 else torch.zeros_like(mu['in'])
        second = var_in + mu['in'] ** 2
        var = {'in': var_in, 'ln': second.mean(1, keepdim=True) - mu['ln'] ** 2,
               'bn': second.mean(0, keepdim=True) - mu['bn'] ** 2}
    else:
        var = {'in': ((x - mu['in']) ** 2).mean(2, keepdim=True),
               'ln': ((x - mu['ln']) ** 2).mean((1, 2), keepdim=True),
               'bn': ((x - mu['bn']) ** 2).mean((0, 2), keepdim=True)}
    if running is not None:
        mu['bn'] = running[0].double().view(1, c, 1)
        var['bn'] = running[1].double().view(1, c, 1)
    mean = sum(mean_ratios[k] * mu[k] for k in mean_ratios)
    variance = sum(var_ratios[k] * var[k] for k in var_ratios)
    y = (x - mean) / torch.sqrt(variance + eps)
    if weight is not None:
        y = y * weight.double().view(1, c, 1) + bias.double().view(1, c, 1)
    return y.reshape(shape), mu['bn'].flatten(), var['bn'].flatten()


def randomized(layer, seed=0):
    """Non-trivial ratios and affine parameters, so every path of the formula matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.mean_weight, layer.var_weight):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=gen))
        if layer.affine:
            layer.weight.copy_(torch.rand(layer.num_features, generator=gen) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=gen))
    return layer


def ratios_of(layer):
    r = layer.ratios()
    return ({k: v.item() for k, v in r['mean'].items()}, {k: v.item() for k, v in r['var'].items()})


def reference_of(layer, x, running=None):
    mean_r, var_r = ratios_of(layer)
    return reference_sn(x, mean_r, var_r, layer.weight, layer.bias, layer.eps,
                        layer.unbiased_instance_var, running)


def sample(shape, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # A per-channel offset and scale so batch, layer and instance statistics all differ.
    c = shape[1]
    offset = torch.randn(c, generator=gen).view(1, c, *[1] * (len(shape) - 2)) * 2
    return (torch.randn(shape, generator=gen) * 1.5 + offset).to(dtype)


@pytest.mark.parametrize('normalizers', SUBSETS)
@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('unbiased', [False, True])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('dims', [1, 2, 3])
def test_forward_matches_reference_train_and_eval(normalizers, tied, unbiased, affine, dims):
    layer = randomized(SwitchableNorm(6, normalizers=normalizers, tied=tied, affine=affine,
                                      unbiased_instance_var=unbiased, momentum=0.25))
    x = sample(SHAPES[dims])
    y = layer(x)
    expected, mu_bn, var_bn = reference_of(layer, x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape

    if 'bn' in normalizers:
        torch.testing.assert_close(layer.running_mean.double(), 0.25 * mu_bn, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), 0.75 + 0.25 * var_bn, rtol=1e-5,
                                   atol=1e-6)
    else:
        assert layer.running_mean is None and layer.running_var is None

    layer.eval()
    x2 = sample(SHAPES[dims], seed=2)
    running = (layer.running_mean, layer.running_var) if 'bn' in normalizers else None
    expected_eval, _, _ = reference_of(layer, x2, running)
    torch.testing.assert_close(layer(x2).double(), expected_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('normalizers', SUBSETS)
@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('unbiased', [False, True])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('training', [True, False])
def test_gradcheck(normalizers, tied, unbiased, affine, training):
    layer = randomized(SwitchableNorm(4, normalizers=normalizers, tied=tied, affine=affine,
                                      unbiased_instance_var=unbiased)).double()
    if 'bn' in normalizers:
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    x = sample((3, 4, 3, 2), dtype=torch.float64).requires_grad_()
    params = [p for p in layer.parameters()]

    def fn(inp, *_):
        return layer(inp)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def reference_gradients(layer, x, g, running=None):
    """Gradients of sum(y * g) by autograd through :func:`reference_sn` in float64, named like the
    layer's parameters (plus 'x')."""
    inputs = {'x': x.detach().double().requires_grad_()}
    inputs.update({name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()})
    mean_r = dict(zip(layer.normalizers, torch.softmax(inputs['mean_weight'], 0)))
    var_r = mean_r if layer.tied else dict(zip(layer.normalizers, torch.softmax(inputs['var_weight'], 0)))
    y, _, _ = reference_sn(inputs['x'], mean_r, var_r, inputs.get('weight'), inputs.get('bias'), layer.eps,
                           layer.unbiased_instance_var, running)
    (y * g.double()).sum().backward()
    return {name: t.grad for name, t in inputs.items()}


def assert_gradients_match_reference(layer, x, g, rtol, atol, running=None):
    """The layer's gradients (``x.grad`` and parameters', after ``backward(g)``) against autograd of
    the float64 formula; ``atol`` is relative to each gradient's largest entry."""
    expected = reference_gradients(layer, x, g, running)
    ours = {'x': x.grad, **{name: p.grad for name, p in layer.named_parameters()}}
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name].double(), grad, rtol=rtol, atol=atol * grad.abs().max().item(),
                                   msg=name)


def test_gradients_match_autograd_of_reference():
    """The hand-written backward against autograd through the plain formula, in float64."""
    layer = randomized(SwitchableNorm(5, unbiased_instance_var=True)).double()
    x = sample((4, 5, 3, 3), dtype=torch.float64).requires_grad_()
    g = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    assert_gradients_match_reference(layer, x, g, rtol=1e-9, atol=1e-10)


def test_float32_matches_float64_reference_to_1e5_relative():
    layer = randomized(SwitchableNorm(32))
    x = sample((4, 32, 16, 16))
    expected, _, _ = reference_of(layer, x)
    rel = ((layer(x).double() - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5


def test_cumulative_average_when_momentum_is_none():
    """In float64 to 1e-12: the 1/k weights must not pass through float32."""
    layer = SwitchableNorm(3, momentum=None).double()
    means, variances = [], []
    for seed in range(3):
        x = sample((2, 3, 4, 4), seed=seed, dtype=torch.float64)
        _, mu, var = reference_of(layer, x)
        means.append(mu)
        variances.append(var)
        layer(x)
    assert layer.num_batches_tracked.item() == 3
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, torch.stack(variances).mean(0), rtol=1e-12, atol=1e-12)


def test_eval_without_running_stats_uses_the_batch():
    layer = randomized(SwitchableNorm(4, track_running_stats=False)).eval()
    x = sample((3, 4, 5, 5))
    expected, _, _ = reference_of(layer, x)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert layer.num_batches_tracked is None


def test_single_sample_batch_equals_instance_statistics():
    layer = SwitchableNorm(4)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, -50.0, 0.0]))  # IN and BN only, equal
        layer.var_weight.copy_(torch.tensor([0.0, -50.0, 0.0]))
    x = sample((1, 4, 6, 6))
    y = layer(x)
    instance = torch.nn.functional.instance_norm(x, eps=layer.eps)
    torch.testing.assert_close(y, instance, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('unbiased', [False, True])
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('batch', [1, 3])
def test_one_by_one_maps_match_reference(unbiased, training, batch):
    layer = randomized(SwitchableNorm(8, unbiased_instance_var=unbiased)).train(training)
    x = sample((batch, 8, 1, 1)).requires_grad_()
    g = torch.randn(x.shape)
    running = None if training else (layer.running_mean.clone(), layer.running_var.clone())
    y = layer(x)
    y.backward(g)
    expected, _, _ = reference_of(layer, x.detach(), running)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    assert_gradients_match_reference(layer, x, g, rtol=1e-4, atol=1e-5, running=running)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    layer = randomized(SwitchableNorm(8))
    x32 = sample((2, 8, 8, 8)).clamp(-6, 6) * 5e3  # |x| up to 3e4: x^2 would overflow float16
    x = x32.to(dtype).requires_grad_()
    g = torch.randn(x.shape).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.backward(g)
    assert x.grad.dtype == dtype
    expected, _, _ = reference_of(layer, x.detach().float())
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    # The input gradient rounds like the output, to a few units of the half type's precision.
    grad_tol = 4 * torch.finfo(dtype).eps
    assert_gradients_match_reference(layer, x, g, rtol=grad_tol, atol=grad_tol)


def test_autocast_keeps_the_input_dtype_and_float32_statistics():
    layer = randomized(SwitchableNorm(8))
    x = sample((2, 8, 6, 6)) * 1e4
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    expected, _, _ = reference_of(layer, x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_backward_saves_one_full_size_tensor():
    """Memory close to BatchNorm: the input plus per-(n, c) statistics, no full-size intermediates."""
    layer = SwitchableNorm(16)
    x = sample((2, 16, 8, 8)).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert sum(n >= x.numel() for n in saved) == 1
    assert sum(saved) < x.numel() + 20 * 2 * 16


def test_ratios_and_initial_state():
    layer = SwitchableNorm(4, normalizers=('bn', 'in'), zero_init=True)
    assert layer.normalizers == ('in', 'bn')
    r = layer.ratios()
    assert set(r['mean']) == {'in', 'bn'}
    assert all(abs(v.item() - 0.5) < 1e-7 for v in r['mean'].values())
    assert torch.equal(layer.weight, torch.zeros(4)) and torch.equal(layer.bias, torch.zeros(4))
    tied = SwitchableNorm(4, tied=True)
    assert tied.var_weight is None and 'var_weight' not in tied.state_dict()
    assert layer.mean_weight.shape == (2,) and tied.mean_weight.shape == (3,)


def test_tied_uses_one_ratio_vector_for_means_and_variances():
    layer = randomized(SwitchableNorm(4, tied=True))
    r = layer.ratios()
    assert r['mean'] == r['var']
    x = sample((3, 4, 5, 5))
    expected, _, _ = reference_of(layer, x)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs, message', [
    (dict(normalizers=('in', 'gn')), 'unknown normalizers'),
    (dict(normalizers=()), 'empty'),
    (dict(normalizers=('in', 'in')), 'repeats'),
    (dict(eps=0.0), 'eps must be > 0'),
    (dict(eps=-1e-5), 'eps must be > 0'),
    (dict(momentum=1.5), 'momentum must be in'),
    (dict(momentum=-0.1), 'momentum must be in'),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SwitchableNorm(4, **kwargs)


def test_unknown_option_names_the_key():
    with pytest.raises(TypeError, match='normaliser'):
        SwitchableNorm(4, normaliser=('in',))


@pytest.mark.parametrize('shape, message', [((4, 4), 'expects an'), ((2, 4, 1, 1, 1, 1), 'expects an'),
                                            ((2, 5, 3, 3), 'built for 4 channels')])
def test_bad_inputs_raise_clear_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        SwitchableNorm(4)(torch.randn(shape))


def test_state_dict_round_trip():
    src = randomized(SwitchableNorm(6))
    src(sample((2, 6, 4, 4)))
    dst = SwitchableNorm(6)
    dst.load_state_dict(src.state_dict())
    assert set(src.state_dict()) == {'weight', 'bias', 'mean_weight', 'var_weight', 'running_mean',
                                     'running_var', 'num_batches_tracked'}
    src.eval()
    dst.eval()
    x = sample((2, 6, 4, 4), seed=5)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_output_accepts_inplace_ops():
    """ConvModule follows the norm with ReLU(inplace=True)."""
    layer = SwitchableNorm(4)
    x = sample((2, 4, 3, 3)).requires_grad_()
    y = torch.relu_(layer(x))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def _relative_errors(layer, x, grad):
    """Output and input-gradient errors of ``layer`` (float32) against its float64 copy, as norms."""
    errors = []
    results = []
    for module, dtype in ((layer, torch.float32), (copy.deepcopy(layer).double(), torch.float64)):
        inp = x.detach().to(dtype).requires_grad_()
        y = module(inp)
        y.backward(grad.to(dtype))
        results.append((y.detach().double(), inp.grad.double()))
    for ours, exact in zip(*results):
        errors.append(((ours - exact).norm() / exact.norm()).item())
    return errors


# Small maps (where IN and LN statistics come from few pixels) and large ones, N from 1 to 8.
OFFSET_SHAPES = [(4, 8, 2, 2), (2, 16, 3, 5), (8, 4, 7, 7), (1, 8, 24, 24), (2, 32, 32, 32)]


@pytest.mark.parametrize('shape', OFFSET_SHAPES, ids=str)
def test_large_offsets_keep_batch_norm_precision(shape):
    """At mean / std = 1e4, for random mean and variance ratio logits (and groups of them), the
    biased or unbiased instance variance: output and input-gradient errors within 2x of torch's
    BatchNorm on the same data. Float64 row means and coefficient math, and a pass centre whose
    rounding the shift makes up for, keep what float32 means would lose: the spreads of means
    between rows (mu_in - mu_ln, mu_in - mu_bn), which made the gradient 11x BatchNorm's error."""
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        layer = SwitchableNorm(shape[1], unbiased_instance_var=bool(seed % 2), ratio_groups=1 + (seed == 3))
        with torch.no_grad():
            for logits in (layer.mean_weight, layer.var_weight):
                logits.copy_(torch.randn(logits.shape, generator=gen) * 2)
        x = torch.randn(shape, generator=gen) + 1e4
        grad = torch.randn(shape, generator=gen)
        sn = torch.tensor(_relative_errors(layer, x, grad))
        bn = torch.tensor(_relative_errors(torch.nn.BatchNorm2d(shape[1]), x, grad))
        assert (sn <= 2 * bn).all(), (seed, (sn / bn).tolist())


@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('normalizers', [NORMALIZERS, ('bn',)])
def test_empty_batch_changes_no_statistics(momentum, normalizers):
    """N = 0 (a rank or a head without RoIs): BatchNorm's behaviour, statistics bit for bit unchanged."""
    layer = randomized(SwitchableNorm(4, momentum=momentum, normalizers=normalizers))
    layer(sample((3, 4, 5, 5)))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.zeros(0, 4, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    layer(sample((3, 4, 5, 5), seed=4))  # the next real batch counts as the second
    assert layer.num_batches_tracked.item() == 2


def test_forward_and_backward_never_read_a_tensor_on_the_host(monkeypatch):
    """No host-device synchronization: no tensor is turned into a Python number (on a GPU each such
    read waits for the queue), also not for the cumulative average or an empty batch."""
    layers = [randomized(SwitchableNorm(4, momentum=None)), randomized(SwitchableNorm(4, normalizers=('bn', 'in')))]
    inputs = [sample((2, 4, 3, 3)).requires_grad_(), torch.zeros(0, 4, 3, 3, requires_grad=True)]

    def refuse(*args):
        raise AssertionError('a tensor was read on the host')

    for name in ('item', 'tolist', '__float__', '__int__', '__bool__', '__index__'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for layer in layers:
        for x in inputs:
            layer(x).sum().backward()
    monkeypatch.undo()
    assert layers[0].num_batches_tracked.item() == 1  # the empty batch does not count


def test_double_backward_raises():
    """Second derivatives are not implemented: asking for them raises instead of being silently wrong
    (``once_differentiable`` alone gives zeros for d(dx)/dx)."""
    layer = randomized(SwitchableNorm(4)).double()
    x = sample((2, 4, 3, 3), dtype=torch.float64).requires_grad_()
    with pytest.raises(RuntimeError, match='SwitchableNormFunction: second derivatives are not implemented'):
        torch.autograd.grad((layer(x) * torch.randn_like(x)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='second derivatives are not implemented'):
        torch.autograd.gradgradcheck(layer, (x,))
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x)  # first order stays available
    assert torch.isfinite(grad).all()


def test_no_input_gradient_pass_when_x_needs_none(monkeypatch):
    """A frozen input (the first norm after a frozen stem) costs no input-gradient pass."""
    from norm_plugins.ops import switchable_norm_fn
    calls = []
    original = switchable_norm_fn.row_normalize_backward
    monkeypatch.setattr(switchable_norm_fn, 'row_normalize_backward',
                        lambda *args: calls.append(1) or original(*args))
    layer = randomized(SwitchableNorm(4))
    layer(sample((2, 4, 3, 3))).sum().backward()
    assert not calls and layer.weight.grad is not None and layer.mean_weight.grad is not None
    layer(sample((2, 4, 3, 3)).requires_grad_()).sum().backward()
    assert calls == [1]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_output_and_gradient_keep_the_memory_format(dtype, memory_format):
    layer = randomized(SwitchableNorm(6))
    x = sample((2, 6, 4, 5)).to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    g = torch.randn(x.shape).to(dtype).contiguous(memory_format=memory_format)
    y = layer(x)
    y.backward(g)
    for t in (y, x.grad):
        assert t.dtype == dtype and t.is_contiguous(memory_format=memory_format)
    expected, _, _ = reference_of(layer, x.detach())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
