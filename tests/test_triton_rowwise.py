"""The Triton kernels of the row-wise passes, run on CPU tensors through Triton's interpreter,
against plain float64 formulas: every shape case (N = 0, N = 1, L = 1, ragged and split rows), NCL
and channels-last layouts for x and g independently, float32/float16/bfloat16/float64, large
offsets, torch custom ops and torch.compile."""
import collections
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from interpreter import require_interpreter

require_interpreter('tests/test_triton_rowwise.py')

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import test_batch_channel_norm as bcn_tests  # noqa: E402
import test_group_switchable_norm as group_sn_tests  # noqa: E402
import test_switchable_norm as sn_tests  # noqa: E402
import test_sync_switchable_norm as sync_tests  # noqa: E402
from norm_plugins import BatchChannelNorm, SwitchableNorm, WSConv2d  # noqa: E402
from norm_plugins.ops import rowwise, triton_kernels, triton_rowwise  # noqa: E402
from norm_plugins.ops.backend import use_triton  # noqa: E402
from norm_plugins.layers.switchable_norm import NORMALIZERS  # noqa: E402
from norm_plugins.ops.triton_rowwise import make_plan  # noqa: E402
from norm_plugins.testing import run_distributed  # noqa: E402
from tools_helpers import REPO  # noqa: E402

HALF_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """CPU tensors run the kernels in Triton's interpreter (the backend asks for TRITON_INTERPRET=1
    to take that slow path)."""
    assert isinstance(triton_kernels.moments_kernel, InterpretedFunction), \
        'triton was imported before TRITON_INTERPRET=1 was set'
    monkeypatch.setenv('TRITON_INTERPRET', '1')


@pytest.fixture
def launches(monkeypatch):
    """The grids of the kernel launches made while the test runs (combine launches excepted)."""
    log, grid = [], triton_rowwise._grid
    monkeypatch.setattr(triton_rowwise, '_grid', lambda *args: log.append(args) or grid(*args))
    return log


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh float tensors start as NaN, so an element a kernel fails to write cannot pass."""
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        return t.fill_(float('nan')) if t.is_floating_point() else t

    monkeypatch.setattr(torch, 'empty_like', lambda *a, **k: poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, 'new_empty',
                        lambda self, *a, **k: poison(new_empty(self, *a, **k)))


def rows(shape, layout, dtype, gen, scale=1.0, offset=0.0):
    """A random (N, C, L) view of a tensor of ``shape`` (N, C, *spatial) stored NC... ('ncl') or
    channels-last ('nlc'), as a layer's ``x.reshape(n, c, -1)`` sees it."""
    n, c = shape[:2]
    if layout == 'ncl':
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        t = torch.randn((n, *shape[2:], c), generator=gen, dtype=torch.float64).movedim(-1, 1)
    t = (t * scale + offset).to(dtype)
    x = t.reshape(n, c, math.prod(shape[2:]))
    assert x.data_ptr() == t.data_ptr(), 'the (N, C, L) view must not copy'
    if layout == 'nlc' and x.numel() and c > 1 and x.shape[2] > 1:
        assert x.stride(1) == 1
    return x


def coefficient(n, c, gen, dtype, scale=1.0, offset=0.0):
    return (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def reference(x, g, m, a, b, p, q):
    """Plain float64 formulas of the four passes."""
    x, g = x.double(), g.double()
    m, a, b, p, q = (t.double()[..., None] for t in (m, a, b, p, q))
    mean = x.mean(2)
    var = (x - mean[..., None]).square().mean(2)
    y = (x - m) * a + b
    sums = (g.sum(2), (g * (x - m)).sum(2))
    dx = g * a + (x - m) * p + q
    return (mean, var), y, sums, dx


def assert_stats_close(actual, expected, acc, scale):
    assert actual.dtype == acc and actual.shape == expected.shape
    tol = 1e-12 if acc == torch.float64 else 1e-5
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


def assert_tensor_close(actual, expected, like):
    assert actual.dtype == like.dtype and actual.shape == like.shape
    assert actual.stride() == like.stride(), 'the output must keep the input\'s layout'
    if like.dtype in HALF_EPS:
        # Stores round once (Triton's interpreter may round bfloat16 one ulp off torch): ulp level.
        eps = HALF_EPS[like.dtype]
        torch.testing.assert_close(actual.double(), expected, rtol=eps, atol=eps)
    else:
        tol = 1e-12 if like.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


def run_all(x, g, m, a, b, p, q, plan=None):
    return (triton_rowwise.row_moments_impl(x, plan),
            triton_rowwise.row_normalize_impl(x, m, a, b, plan),
            triton_rowwise.row_grad_sums_impl(g, x, m, plan),
            triton_rowwise.row_normalize_backward_impl(g, x, m, a, p, q, plan))


def check_all(shape, x_layout, g_layout, dtype, plan_args=None, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = rows(shape, x_layout, dtype, gen, offset=offset)
    g = rows(shape, g_layout, dtype, gen)
    n, c, _ = x.shape
    acc = rowwise.accumulation_dtype(dtype)
    m = coefficient(n, c, gen, acc, offset=offset)
    a, b, p, q = (coefficient(n, c, gen, acc) for _ in range(4))
    plan = plan_args and make_plan(tuple(x.shape), x.stride(), 132, **plan_args)
    (mean, var), y, (sum_g, sum_gx), dx = run_all(x, g, m, a, b, p, q, plan)
    (ref_mean, ref_var), ref_y, (ref_sg, ref_sgx), ref_dx = reference(x, g, m, a, b, p, q)
    length = x.shape[2]
    # The mean is float64, precise relative to the row's spread whatever its offset.
    assert mean.dtype == rowwise.MEAN_DTYPE
    assert_stats_close(mean.to(acc), ref_mean, acc, 1.0)
    assert_stats_close(var, ref_var, acc, 1.0)
    assert_stats_close(sum_g, ref_sg, acc, math.sqrt(length))
    assert_stats_close(sum_gx, ref_sgx, acc, length)
    assert_tensor_close(y, ref_y, x)
    assert_tensor_close(dx, ref_dx, x)


SHAPES = {
    'ragged': (2, 3, 7, 9),        # L = 63: no tile is full
    'empty-batch': (0, 3, 4, 5),   # N = 0, as on a SyncSN rank without images
    'one-sample': (1, 4, 5, 7),
    'one-pixel': (3, 5, 1, 1),     # L = 1
    'seq': (2, 6, 40),             # 1D layers: (N, C, L)
    'volume': (2, 3, 3, 4, 5),     # 3D layers: (N, C, D, H, W)
    'long': (1, 3, 4500),          # rows longer than a tile: split by the default plan
}
LAYOUTS = [('ncl', 'ncl'), ('nlc', 'nlc'), ('ncl', 'nlc'), ('nlc', 'ncl')]


@pytest.mark.parametrize('layouts', LAYOUTS, ids='-'.join)
@pytest.mark.parametrize('case', list(SHAPES))
def test_float32_shapes_and_layouts(poisoned, case, layouts):
    check_all(SHAPES[case], *layouts, torch.float32)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize('case', ['ragged', 'one-pixel', 'long'])
def test_other_dtypes(poisoned, case, dtype):
    check_all(SHAPES[case], 'nlc', 'ncl', dtype)
    check_all(SHAPES[case], 'ncl', 'nlc', dtype, seed=1)


@pytest.mark.parametrize('plan_args', [
    dict(split=7, block_l=32),                  # chunks of 2 tiles: 300 = 4 x 64 + 44
    dict(split=3, block_l=16, block_c=2),       # channel tiles that overhang C = 3
    dict(split=100, block_l=64, block_c=4),     # more splits asked for than tiles exist
    dict(split=2, block_l=512, block_c=4),      # one tile longer than the row
], ids=str)
@pytest.mark.parametrize('layouts', LAYOUTS[:3], ids='-'.join)
def test_forced_split_rows(poisoned, plan_args, layouts):
    """The two-stage reduction of very long rows (2x64x400x672), exercised on small ones."""
    check_all((2, 3, 300), *layouts, torch.float32, plan_args)


def test_large_offset_keeps_precision(poisoned):
    """mean / std = 1e4: the shifted Welford moments (split rows too) give the mean to float32
    precision of the spread (a float32 mean would be off by up to an ulp of 1e4) and the variance
    to 1e-6, and the centred forms keep full precision, where E[x^2] - E[x]^2 or x * A + B would
    lose about eight digits."""
    for layouts, plan_args in [(('ncl', 'ncl'), None), (('nlc', 'ncl'), None),
                               (('ncl', 'nlc'), dict(split=5, block_l=64))]:
        check_all((2, 3, 30, 41), *layouts, torch.float32, plan_args, offset=1e4)
    gen = torch.Generator().manual_seed(3)
    x = rows((2, 16, 16, 16), 'ncl', torch.float32, gen, offset=1e4)
    ref_var, ref_mean = torch.var_mean(x.double(), 2, correction=0)
    for plan_args in (None, dict(split=3, block_l=16), dict(split=8, block_l=16, block_c=4)):
        plan = plan_args and make_plan(tuple(x.shape), x.stride(), 132, **plan_args)
        mean, var = triton_rowwise.row_moments_impl(x, plan)
        assert (mean - ref_mean).abs().max() <= 1e-5, plan  # an ulp of 1e4 in float32 is 1e-3
        assert ((var.double() - ref_var) / ref_var).abs().max() < 1e-6, plan


def test_broadcast_coefficients_and_gapped_strides():
    """(C,) and (1, C) coefficients broadcast through zero strides (as eval-mode BN statistics);
    an x with gaps between its elements is read in place and gives a dense output."""
    gen = torch.Generator().manual_seed(4)
    gapped = rows((2, 6, 30), 'ncl', torch.float32, gen)[:, ::2, 1::3]
    for x in (rows((2, 3, 5, 6), 'nlc', torch.float32, gen), gapped):
        m, a = coefficient(1, 3, gen, torch.float32), coefficient(1, 3, gen, torch.float32)[0]
        y = triton_rowwise.row_normalize_impl(x, m, a, torch.tensor(0.5))
        torch.testing.assert_close(y, (x - m[..., None]) * a[:, None] + 0.5, rtol=1e-5, atol=1e-5)
        mean, var = triton_rowwise.row_moments_impl(x)
        torch.testing.assert_close(mean, x.double().mean(2), rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match='reshape'):
        triton_rowwise.row_moments_impl(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match='one shape'):
        triton_rowwise.row_grad_sums_impl(torch.randn(2, 3, 4), torch.randn(2, 3, 5),
                                          torch.zeros(2, 3))


@pytest.mark.parametrize('shape', [(2, 64, 400 * 672), (2, 256, 200 * 336), (16, 256, 56 * 56),
                                   (4, 3, 1), (1, 1, 10**6), (0, 8, 10), (7, 1000, 3), (2, 256, 25 * 42),
                                   (2, 256, 13 * 21), (1024, 256, 49)])
@pytest.mark.parametrize('layout', ['ncl', 'nlc'])
def test_plan_fills_the_gpu(shape, layout):
    """The split covers every row exactly once and asks for enough programs to fill 132 SMs, unless
    its chunks would hold fewer than MIN_CHUNK_ELEMENTS (a combine launch costs more than idle SMs
    there); the tile pads a row as little as a power of two allows."""
    n, c, length = shape
    strides = (c * length, length, 1) if layout == 'ncl' else (c * length, 1, c)
    plan = make_plan(shape, strides, 132)
    assert plan.chunk % plan.block_l == 0
    assert (plan.split - 1) * plan.chunk < length <= plan.split * plan.chunk
    assert plan.block_c * plan.block_l <= triton_rowwise.TILE
    tiles = math.ceil(length / plan.block_l)
    programs = n * math.ceil(c / plan.block_c) * plan.split
    # Whole tiles per chunk may round the split down, never below half the target.
    groups = n * math.ceil(c / plan.block_c)
    worth_splitting = max(1, plan.block_c * length // triton_rowwise.MIN_CHUNK_ELEMENTS)
    assert 2 * programs >= min(4 * 132, groups * tiles, groups * worth_splitting) \
        or plan.split == triton_rowwise.MAX_SPLIT
    assert plan.block_c * plan.chunk >= min(triton_rowwise.MIN_CHUNK_ELEMENTS, plan.block_c * length) \
        or plan.split == 1
    if layout == 'nlc' and c > 1 and length > 1:
        assert plan.block_c > 1, 'channels-last tiles must run along the contiguous channels'
    if (n, c, length) == (2, 64, 400 * 672):
        assert plan.split > 1
    if layout == 'ncl' and length > 1:
        padded = {w: math.ceil(length / w) * w for w in (2**k for k in range(5, 12))}
        assert math.ceil(length / plan.block_l) * plan.block_l <= max(length * 9 / 8, min(padded.values()))
    if layout == 'ncl' and (n, c, length) in ((2, 256, 25 * 42), (2, 256, 13 * 21)):
        assert plan.split == 1, 'the small FPN levels take one launch per pass'


def test_fit_tile_pads_fpn_levels_little():
    """L = 1050 (P5 of 800x1344) and 273 (P6) in tiles padding under 1/8, not in one 2048- or
    512-wide tile that is mostly masked."""
    assert triton_rowwise.fit_tile(1050, 2048) == 128  # 9 tiles, 1152 positions
    assert triton_rowwise.fit_tile(273, 2048) == 32  # 9 tiles, 288
    assert triton_rowwise.fit_tile(67200, 2048) == 2048
    assert triton_rowwise.fit_tile(4200, 2048) == 512  # P4: 9 tiles, 4608
    assert triton_rowwise.fit_tile(49, 2048) == 32  # no width pads 49 by under 1/8: the least padding
    assert triton_rowwise.fit_tile(3, 2048) == 4


def test_dispatch_from_rowwise(monkeypatch, launches):
    """rowwise.py's functions reach the kernels with NORM_PLUGINS_BACKEND=triton and agree with the
    torch path."""
    gen = torch.Generator().manual_seed(5)
    x = rows((2, 3, 4, 5), 'nlc', torch.float32, gen)
    g = rows((2, 3, 4, 5), 'ncl', torch.float32, gen)
    m, a, b, p, q = (coefficient(2, 3, gen, torch.float32) for _ in range(5))
    results = {}
    for backend in ('torch', 'triton'):
        monkeypatch.setenv('NORM_PLUGINS_BACKEND', backend)
        results[backend] = (*rowwise.row_moments(x), rowwise.row_normalize(x, m, a, b),
                            *rowwise.row_grad_sums(g, x, m),
                            rowwise.row_normalize_backward(g, x, m, a, p, q))
        assert len(launches) == (4 if backend == 'triton' else 0)
    for got, want in zip(results['triton'], results['torch']):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.stride() == want.stride()


def test_custom_ops_registered():
    """The four passes are torch.ops.norm_plugins custom ops whose fake implementations agree with
    the real ones (schema, fake tensors, dispatch)."""
    gen = torch.Generator().manual_seed(6)
    x = rows((2, 3, 2, 3), 'nlc', torch.float16, gen)
    g = rows((2, 3, 2, 3), 'ncl', torch.float16, gen)
    m, a, b, p, q = (coefficient(2, 3, gen, torch.float32) for _ in range(5))
    ops = torch.ops.norm_plugins
    for op, args in [(ops.row_moments, (x,)), (ops.row_normalize, (x, m, a, b)),
                     (ops.row_grad_sums, (g, x, m)),
                     (ops.row_normalize_backward, (g, x, m, a, p, q))]:
        torch.library.opcheck(op, args, test_utils=('test_schema', 'test_faketensor'))


def test_torch_compile_matches_eager(monkeypatch):
    """A compiled function calling all four passes runs the kernels (opaque custom ops) and matches
    eager."""
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')
    gen = torch.Generator().manual_seed(7)
    x = rows((2, 3, 4, 5), 'nlc', torch.float32, gen)
    g = rows((2, 3, 4, 5), 'ncl', torch.float32, gen)

    def norm_step(x, g):
        mean, var = rowwise.row_moments(x)
        rstd = (var + 1e-5).rsqrt()
        y = rowwise.row_normalize(x, mean, rstd, torch.zeros_like(mean))
        sum_g, sum_gx = rowwise.row_grad_sums(g, x, mean)
        count = x.shape[2]
        p = -sum_gx * rstd.pow(3) / count
        q = -sum_g * rstd / count
        return y, rowwise.row_normalize_backward(g, x, mean, rstd, p, q)

    torch._dynamo.reset()
    # aot_eager traces through dynamo, fake tensors and functionalization, where an op that is not
    # opaque fails on CPU (triton_op does); inductor's codegen of the (N, C) math adds only minutes.
    compiled = torch.compile(norm_step, backend='aot_eager', fullgraph=True)
    for got, want in zip(compiled(x, g), norm_step(x, g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.stride() == want.stride()
    # The same function is layer norm over L: check the pair against autograd in float64.
    xd = x.double().requires_grad_()
    ref = torch.nn.functional.layer_norm(xd, xd.shape[2:], eps=1e-5)
    ref.backward(g.double())
    y, dx = compiled(x, g)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), xd.grad, rtol=1e-4, atol=1e-4)


# Layers on the kernels: SN, SyncSN and BCN with NORM_PLUGINS_BACKEND=triton against the torch path
# (float32) and the float64 layer, forward, backward and buffers, train then eval.

@pytest.fixture
def layer_step(monkeypatch, launches):
    def step(layer, x, g, backend):
        """One forward+backward under ``backend``: output, input and parameter gradients and
        buffers."""
        monkeypatch.setenv('NORM_PLUGINS_BACKEND', backend)
        layer.zero_grad()
        x = x.detach().requires_grad_()
        before = len(launches)
        y = layer(x)
        forward = len(launches)
        y.backward(g)
        if backend == 'triton':
            assert before < forward < len(launches), 'forward and backward must run the kernels'
        assert y.stride() == x.stride(), 'the output must keep the input\'s layout'
        return [y, x.grad, *(p.grad for p in layer.parameters()),
                *(b.clone() for b in layer.buffers())]
    return step


def assert_all_close(got, want, tol):
    """Each tensor within ``tol`` relative to its largest reference value (or 1)."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, i
        if a.numel():
            scale = 1 + b.double().abs().max().item()
            error = (a.double() - b.double()).abs().max().item()
            assert error <= tol * scale, (i, error, scale)


def check_layer_on_kernels(step, layer, shape, channels_last=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 1.5 + 0.5).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    on_torch, exact = copy.deepcopy(layer), copy.deepcopy(layer).double()
    for training in (True, False):
        for module in (layer, on_torch, exact):
            module.train(training)
        got = step(layer, x, g, 'triton')
        want = step(on_torch, x, g, 'torch')
        if dtype in HALF_EPS:  # both paths round the same float32 values once: ulp level
            assert_all_close(got[:2], want[:2], HALF_EPS[dtype])
            assert_all_close(got[2:], want[2:], 1e-5)
        else:
            assert_all_close(got, want, 1e-5)
            assert_all_close(got, step(exact, x.double(), g.double(), 'torch'), 1e-5)


class GivenRatioSN(SwitchableNorm):
    """SN handing its function softmaxed ratios with their own gradients, as sparse SN hands over
    SparsestMax's (``mixing_inputs`` with ``are_logits=False``)."""

    def mixing_inputs(self):
        var = None if self.var_weight is None else self.var_weight.softmax(-1)
        return self.mean_weight.softmax(-1), var, False


SN_CONFIGS = {
    'default': {},
    'in-ln': dict(normalizers=('in', 'ln')),
    'bn': dict(normalizers=('bn',)),
    'in-bn': dict(normalizers=('in', 'bn')),
    'tied': dict(tied=True),
    'unbiased': dict(unbiased_instance_var=True),
    'no-affine': dict(affine=False),
    'no-running-stats': dict(track_running_stats=False, momentum=None),
    'cumulative': dict(momentum=None),
    'groups': dict(ratio_groups=2),
    'groups-tied-in-bn': dict(ratio_groups=4, tied=True, normalizers=('in', 'bn')),
    'given-ratios': dict(cls=GivenRatioSN),
    'given-ratios-groups': dict(cls=GivenRatioSN, ratio_groups=2, unbiased_instance_var=True),
}


def make_sn(config):
    options = {'momentum': 0.3, **SN_CONFIGS[config]}
    layer = options.pop('cls', SwitchableNorm)(4, **options)
    return sn_tests.randomized(layer)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('config', list(SN_CONFIGS))
def test_switchable_norm_on_kernels(layer_step, config, channels_last):
    check_layer_on_kernels(layer_step, make_sn(config), (2, 4, 3, 5), channels_last)


@pytest.mark.parametrize('selected', ['in', 'ln', 'bn'])
def test_single_selection_on_kernels(layer_step, selected):
    """A hardened layer selecting one normalizer everywhere runs on that normalizer's statistics
    alone, on the kernels as on the torch path."""
    layer = SwitchableNorm(4, ratio_groups=2, hard_ratios=True)
    with torch.no_grad():
        for logits in layer._mixture_logits().values():
            logits.fill_(-1e4)[:, NORMALIZERS.index(selected)] = 0
    layer.load_state_dict(layer.state_dict())
    assert layer._selected_normalizer() == selected
    check_layer_on_kernels(layer_step, layer, (2, 4, 3, 5))


def test_empty_batch_on_kernels(monkeypatch):
    """N = 0 on the kernels: empty outputs and gradients, running statistics, estimates and the
    batch counter untouched."""
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')
    for layer in (SwitchableNorm(4), BatchChannelNorm(4, num_groups=2),
                  BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.5)):
        before = {name: b.clone() for name, b in layer.named_buffers()}
        x = torch.randn(0, 4, 3, 5, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        for name, b in layer.named_buffers():
            assert torch.equal(b, before[name]), (type(layer).__name__, name)


@pytest.mark.parametrize('shape', [(3, 4, 7), (2, 4, 3, 2, 3), (3, 4, 1, 1), (1, 4, 3, 5)],
                         ids=['1d', '3d', 'one-pixel', 'one-sample'])
def test_switchable_norm_on_kernels_shapes(layer_step, shape):
    unbiased = shape == (3, 4, 1, 1)  # the L - 1 correction must stay finite on 1x1 maps
    layer = sn_tests.randomized(SwitchableNorm(4, unbiased_instance_var=unbiased))
    check_layer_on_kernels(layer_step, layer, shape)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('estimate', [False, True], ids=['large-batch', 'micro-batch'])
def test_batch_channel_norm_on_kernels(layer_step, estimate, channels_last):
    layer = BatchChannelNorm(4, num_groups=2, estimate=estimate, update_rate=0.3, momentum=0.3)
    bcn_tests.randomize_affine(layer)
    check_layer_on_kernels(layer_step, layer, (2, 4, 3, 5), channels_last)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_half_layers_on_kernels(layer_step, dtype):
    sn = sn_tests.randomized(SwitchableNorm(4))
    check_layer_on_kernels(layer_step, sn, (2, 4, 3, 5), channels_last=True, dtype=dtype)
    bcn = BatchChannelNorm(4, num_groups=2, estimate=True)
    bcn_tests.randomize_affine(bcn)
    check_layer_on_kernels(layer_step, bcn, (2, 4, 3, 5), dtype=dtype)


def test_large_offsets_on_kernels(monkeypatch):
    """The previous issue's bound at mean / std = 1e4 (output and input-gradient errors within 2x of
    torch BatchNorm's) holds on the kernel path."""
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')
    for shape in sn_tests.OFFSET_SHAPES[:4]:
        sn_tests.test_large_offsets_keep_batch_norm_precision(shape)
    for estimate in (False, True):
        bcn_tests.test_large_offset_error_within_twice_batchnorm(estimate)


def _sync_rank_on_kernels(rank, world, sizes, out_dir):
    assert os.environ.get('NORM_PLUGINS_BACKEND') == 'triton' and use_triton(torch.zeros(1))
    sync_tests._rank_run(rank, world, sizes, out_dir)


@pytest.mark.slow
def test_sync_switchable_norm_on_kernels(monkeypatch, tmp_path):
    """SyncSN on the kernels over gloo, with unequal and empty ranks, equals SN on the concatenated
    batch (the torch path) in outputs, gradients and running statistics."""
    sizes = (2, 0, 1)
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')  # the spawned ranks inherit it
    run_distributed(_sync_rank_on_kernels, len(sizes), sizes, str(tmp_path))
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'torch')
    for unbiased in (False, True):
        sync_tests.check_against_sn(tmp_path, sizes, unbiased)


def _bcn_rank_on_kernels(rank, world, sizes, out_dir):
    assert use_triton(torch.zeros(1))
    bcn_tests._distributed_worker(rank, world, sizes, out_dir)


@pytest.mark.slow
def test_synchronized_bcn_on_kernels(monkeypatch, tmp_path):
    """Micro-batch estimates and synchronized large-batch BCN on the kernels over gloo, with an empty
    rank, equal BCN on the concatenated batch (the torch path); empty global batches change
    nothing; no host synchronization."""
    sizes = (2, 0, 3)
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')
    run_distributed(_bcn_rank_on_kernels, len(sizes), sizes, str(tmp_path))
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'torch')
    bcn_tests.check_distributed_results(tmp_path, sizes)


def _group_sn_rank_on_kernels(rank, world, sizes, out_dir):
    assert use_triton(torch.zeros(1))
    group_sn_tests.sync_rank(rank, world, sizes, out_dir)


@pytest.mark.slow
def test_synchronized_group_sn_on_kernels(monkeypatch, tmp_path):
    """SyncSN with three ratio groups on the kernels over gloo, unequal and empty ranks, equals group
    SN on the concatenated batch (the torch path)."""
    sizes = (1, 0, 2)
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')
    run_distributed(_group_sn_rank_on_kernels, len(sizes), sizes, str(tmp_path))
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'torch')
    group_sn_tests.check_sync_against_sn(tmp_path, sizes)


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['auto', 'triton'])
def test_torch_compile_of_layers(monkeypatch, launches, backend):
    """Conv-SN-ReLU and WSConv-BCN-ReLU under torch.compile equal eager over two training steps and
    an eval forward: the default backend (the torch path on CPU) through inductor, and the kernels
    (opaque custom ops inside the layers' autograd functions) through aot_eager."""
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', backend)
    compile_backend = 'inductor' if backend == 'auto' else 'aot_eager'
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SwitchableNorm(8), nn.ReLU()),
              nn.Sequential(WSConv2d(3, 8, 3, padding=1), BatchChannelNorm(8, num_groups=4),
                            nn.ReLU())]
    for eager in models:
        sn_or_bcn = eager[1]
        if isinstance(sn_or_bcn, SwitchableNorm):
            sn_tests.randomized(sn_or_bcn)
        else:
            bcn_tests.randomize_affine(sn_or_bcn)
        twin = copy.deepcopy(eager)
        torch._dynamo.reset()
        compiled = torch.compile(twin, backend=compile_backend)
        for step in range(3):
            training = step < 2
            eager.train(training)
            twin.train(training)
            x = torch.randn(2, 3, 5, 6)
            g = torch.randn(2, 8, 5, 6)
            results = []
            for model in (eager, compiled):
                model.zero_grad()
                xs = x.clone().requires_grad_()
                y = model(xs)
                y.backward(g)
                results.append([y, xs.grad, *(p.grad for p in model.parameters()),
                                *(b.clone() for b in model.buffers())])
            assert_all_close(results[1], results[0], 1e-5)
    assert bool(launches) == (backend == 'triton')


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills():
    """The interpreter runs the kernels as Python; tools/triton_kernels_report.py compiles them for
    sm_90 (no GPU needed) in a process without it, as the layers launch them at the FPN levels P2,
    P4, P5 and P6 in both layouts, float32 and bfloat16, plus the coefficient kernels: every launch
    compiles, none spills or needs more than 128 registers, and x, g, y and dx are accessed as wide
    as their rows' alignment allows: 16 bytes for channels-last and for NCL rows of L a multiple of
    16 (P2) or of a vector's elements (P4, L = 4200, through ROW_ALIGN), one element for P5
    (L = 1050 = 2 x 525) and P6 (L = 273)."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    # The tree under test, whether or not norm_plugins is installed (stage 1 of gpu_check.sh installs nothing).
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    report = subprocess.run([sys.executable, str(REPO / 'tools' / 'triton_kernels_report.py')],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    lines = [line for line in report.stdout.splitlines() if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip('|').split('|'))))
            for line in lines[2:]]  # after the header and the separator
    passes = {'moments_kernel', 'grad_sums_kernel', 'normalize_kernel', 'normalize_backward_kernel'}
    by_kernel = collections.Counter(row['kernel'] for row in rows)
    assert all(by_kernel[name] == 4 * 2 * 2 for name in passes), by_kernel
    assert {'sn_forward_kernel', 'sn_channel_grad_kernel', 'sn_sample_grad_kernel', 'sn_ratio_grad_kernel',
            'batch_sums_kernel', 'bcn_forward_kernel', 'bcn_sample_grad_kernel', 'bcn_channel_grad_kernel',
            'bcn_batch_terms_kernel'} <= set(by_kernel)
    element_bits = {'float32': 32, 'bfloat16': 16}
    levels = {'P2': 200 * 336, 'P4': 50 * 84, 'P5': 25 * 42, 'P6': 13 * 21}
    for row in rows:
        assert row['stack'] == '0' and int(row['registers']) <= 128, row
        if row['kernel'] not in passes:
            continue
        # NCL rows take whole 16-byte vectors when L allows them, else single elements.
        bits = element_bits[row['dtype']]
        whole_vectors = row['layout'] == 'channels-last' or levels[row['level']] % (128 // bits) == 0
        expected = 128 if whole_vectors else bits
        # The widest access a kernel makes is x's (moments loads), y's or dx's (normalize stores);
        # the other passes also load (N, C) coefficients, contiguous along C, so theirs is a bound.
        if row['kernel'] == 'moments_kernel':
            assert int(row['load bits']) == expected, row
        else:
            assert int(row['load bits']) >= expected, row
        if row['kernel'].startswith('normalize'):
            assert int(row['store bits']) == expected, row
    assert {row['ROW_ALIGN'] for row in rows if row['level'] == 'P4' and row['layout'] == 'ncl'} == {'4', '8'}
