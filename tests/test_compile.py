"""torch.compile with the layers inside, as far as a CPU shows it: no graph break inside the layers'
forward (train and eval, both backends; the kernels' custom ops opaque), and Conv-SN-ReLU compiled
by inductor with ``dynamic=True`` equal to eager across input sizes without recompiling. These are
the preconditions of ``mode='reduce-overhead'`` (CUDA graphs) on a GPU, with no host
synchronization (tests/test_triton_launches.py) and shape-only Python branching."""
import copy

import pytest
import torch
from torch import nn

from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d

LAYERS = {
    'SN': lambda: SwitchableNorm(8),
    'SN-groups-tied': lambda: SwitchableNorm(8, ratio_groups=2, tied=True),
    'SyncSN': lambda: SyncSwitchableNorm(8),
    'BCN': lambda: BatchChannelNorm(8, num_groups=4),
    'BCN-micro': lambda: BatchChannelNorm(8, num_groups=4, estimate=True),
}


def block(name):
    return nn.Sequential(WSConv2d(3, 8, 3, padding=1), LAYERS[name](), nn.ReLU())


@pytest.mark.parametrize('backend', ['torch', 'triton'])
@pytest.mark.parametrize('name', list(LAYERS))
def test_no_graph_break_inside_the_layers(monkeypatch, name, backend):
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', backend)
    model = block(name)
    for training in (True, False):
        model.train(training)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 5, 6))
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1


def compiled_run(model, sizes, compile_model=True):
    """Forward and backward of ``model`` (compiled by inductor with ``dynamic=True``) at each input
    size: the results and the number of graphs compiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run = torch.compile(model, backend='inductor', dynamic=True) if compile_model else model
    results = []
    for size in sizes:
        gen = torch.Generator().manual_seed(size[0])
        x = torch.randn(size[0], 3, *size[1:], generator=gen).requires_grad_()
        g = torch.randn(size[0], 8, *size[1:], generator=gen)
        model.zero_grad()
        y = run(x)
        y.backward(g)
        results.append([y, x.grad, *(p.grad.clone() for p in model.parameters()), *(b.clone() for b in model.buffers())])
    return results, torch._dynamo.utils.counters['stats']['unique_graphs']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['SN', 'BCN-micro'])
def test_inductor_dynamic_compile_matches_eager_and_adds_no_recompiles(name):
    """Conv-norm-ReLU under inductor with dynamic shapes over three input sizes equals eager, and
    compiles no more graphs than the same block without the norm (CPU convolutions specialize the
    width themselves)."""
    sizes = ((2, 5, 6), (3, 7, 4), (1, 9, 11))
    torch.manual_seed(0)
    eager = block(name)
    want, _ = compiled_run(copy.deepcopy(eager), sizes, compile_model=False)
    got, graphs = compiled_run(copy.deepcopy(eager), sizes)
    for got_step, want_step in zip(got, want):
        for a, b in zip(got_step, want_step):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    without_norm = nn.Sequential(WSConv2d(3, 8, 3, padding=1), nn.ReLU())
    _, baseline = compiled_run(without_norm, sizes)
    assert graphs == baseline, (graphs, baseline)
