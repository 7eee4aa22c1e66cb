"""The torch path of the four row-wise passes (ops/rowwise.py) against plain float64 formulas, for
every layout it takes without a copy (NCL, channels-last, x and g independently), other strides,
empty batches, 1x1 maps, all float dtypes, and large offsets; on the CPU both through the fused
loops (ops/cpu_fused.py) and the ATen-op route, and what happens when a fused loop cannot compile."""
import random
import warnings

import pytest
import torch

from norm_plugins.ops import cpu_fused, rowwise

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'torch')


@pytest.fixture(params=['fused', 'aten'])
def cpu_route(monkeypatch, request):
    """The fused CPU loops, or the ATen-op route they replace."""
    monkeypatch.setenv(cpu_fused.ENV_VAR, 'auto' if request.param == 'fused' else 'off')


def rows(shape, layout, dtype, gen, offset=0.0):
    """An (N, C, L) tensor as a layer's ``x.reshape(n, c, -1)`` of an NC... ('ncl'), channels-last
    ('nlc') or sliced ('strided') input sees it."""
    n, c, length = shape
    if layout == 'ncl':
        t = torch.randn(n, c, length, generator=gen, dtype=torch.float64)
    elif layout == 'nlc':
        t = torch.randn(n, length, c, generator=gen, dtype=torch.float64).transpose(1, 2)
    else:
        t = torch.randn(n, c, 2 * length, generator=gen, dtype=torch.float64)[..., ::2]
    return (t + offset).to(dtype)


def run_passes(shape, x_layout, g_layout, dtype, offset=0.0):
    gen = torch.Generator().manual_seed(0)
    x, g = rows(shape, x_layout, dtype, gen, offset), rows(shape, g_layout, dtype, gen)
    acc = rowwise.accumulation_dtype(dtype)
    m = (torch.randn(shape[:2], generator=gen, dtype=torch.float64) + offset).to(acc)
    a, b, p, q = (torch.randn(shape[:2], generator=gen, dtype=torch.float64).to(acc) for _ in range(4))
    results = (rowwise.row_moments(x), rowwise.row_normalize(x, m, a, b), rowwise.row_grad_sums(g, x, m),
               rowwise.row_normalize_backward(g, x, m, a, p, q))
    xd, gd = x.double(), g.double()
    md, ad, bd, pd, qd = (t.double()[..., None] for t in (m, a, b, p, q))
    mean = xd.mean(2, keepdim=True)
    expected = ((mean[..., 0], (xd - mean).square().mean(2)), (xd - md) * ad + bd,
                (gd.sum(2), (gd * (xd - md)).sum(2)), gd * ad + (xd - md) * pd + qd)
    return x, acc, results, expected


def assert_within(ours, ref, bound):
    """Every element of ``ours`` within ``bound`` (elementwise) of ``ref``."""
    error = (ours.double() - ref).abs()
    assert (error <= bound).all(), (error.max().item(), error / bound)


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('layouts', [('ncl', 'ncl'), ('nlc', 'nlc'), ('ncl', 'nlc'), ('nlc', 'ncl'),
                                     ('strided', 'ncl')], ids='-'.join)
@pytest.mark.parametrize('shape', [(2, 3, 7), (0, 3, 5), (1, 4, 1), (3, 5, 1), (2, 4, 300)], ids=str)
def test_passes_match_float64_formulas(cpu_route, shape, layouts, dtype):
    x, acc, ((mean, var), y, (sum_g, sum_gc), dx), expected = run_passes(shape, *layouts, dtype)
    (ref_mean, ref_var), ref_y, (ref_sg, ref_sgc), ref_dx = expected
    stat_tol = 1e-12 if acc == torch.float64 else 1e-5
    # Means are float64 from every input dtype, exact to the accumulation's precision relative to
    # the row's spread (not to its offset).
    assert mean.dtype == rowwise.MEAN_DTYPE and mean.shape == shape[:2]
    spread = (x.double() - ref_mean[..., None]).abs().amax(2) if x.numel() else 0
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0) if not x.numel() else \
        assert_within(mean, ref_mean, stat_tol * spread)
    for ours, ref, scale in ((var, ref_var, 1), (sum_g, ref_sg, shape[2]), (sum_gc, ref_sgc, shape[2])):
        assert ours.dtype == acc and ours.shape == shape[:2]
        torch.testing.assert_close(ours.double(), ref, rtol=stat_tol, atol=stat_tol * scale)
    tol = TOLERANCE[dtype]
    for ours, ref in ((y, ref_y), (dx, ref_dx)):
        assert ours.dtype == dtype and ours.stride() == x.stride(), 'x\'s dtype and layout'
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize('layout', ['ncl', 'nlc'])
def test_large_offsets_keep_float32_precision(cpu_route, layout):
    """At mean / std = 1e4: the mean to 1e-6 of the rows' spread (a float32 mean would be off by up
    to offset * 2^-24, 6e-4), the variance and centred outputs to float32 precision."""
    offset = 1e4
    x, _, ((mean, var), y, (sum_g, sum_gc), dx), expected = run_passes((2, 3, 500), layout, layout,
                                                                       torch.float32, offset)
    (ref_mean, ref_var), ref_y, (_, ref_sgc), ref_dx = expected
    assert_within(mean, ref_mean, 1e-6 * (x.double() - ref_mean[..., None]).abs().amax(2))
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(sum_gc.double(), ref_sgc, rtol=0, atol=1e-5 * ref_sgc.abs().max().item())
    for ours, ref in ((y, ref_y), (dx, ref_dx)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-5)


def test_a_pass_that_cannot_compile_takes_the_aten_route(monkeypatch):
    """A fused loop that fails to compile (no C++ compiler, an inductor bug) warns once, and inputs
    like those take the ATen-op route from then on, with the same results; other variants keep
    their fused loops."""
    monkeypatch.setattr(cpu_fused, '_FAILED', set())

    def broken(*args):
        raise RuntimeError('no compiler')

    monkeypatch.setitem(cpu_fused._COMPILED, 'moments', broken)
    x = torch.randn(2, 3, 40, dtype=torch.float32) + 5
    with pytest.warns(RuntimeWarning, match='could not be compiled .* ATen-op route'):
        mean, var = rowwise.row_moments(x)
    torch.testing.assert_close(mean, x.double().mean(2), rtol=1e-12, atol=1e-6)
    assert len(cpu_fused._FAILED) == 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        rowwise.row_moments(x + 1)  # the same variant: no second attempt, no second warning
    assert cpu_fused.run('moments', torch.randn(1, 3, 40)) is None  # a variant of its own: tried
    assert len(cpu_fused._FAILED) == 2


@pytest.mark.slow
def test_fused_loops_compile_for_every_layout_and_size_class():
    """60 random (N, C, L) and layouts, sizes of 1 and rows shorter than, a multiple of or longer
    than a chunk among them: every variant compiles (no ATen fallback), in few graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cpu_fused._COMPILED.clear()
    rng = random.Random(0)
    for _ in range(60):
        n, c = rng.choice([1, 2, 3, 8]), rng.choice([1, 3, 16, 64, 256])
        length = rng.choice([1, 7, 49, 64, 196, 273, 1050, 4200])
        x = torch.randn(n, c, length) if rng.random() < 0.5 else torch.randn(n, length, c).transpose(1, 2)
        g, centre = torch.randn_like(x), torch.randn(n, c)
        for name, args in (('moments', (x,)), ('normalize', (x, centre, centre, centre)),
                           ('grad_sums', (g, x, centre)), ('backward', (g, x, centre, centre, centre, centre))):
            assert cpu_fused.run(name, *args) is not None, (name, x.shape, x.stride())
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] <= 4 * 24
