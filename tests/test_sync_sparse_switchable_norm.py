"""SyncSSN in real gloo process groups: SSN on the concatenated batch with unequal and empty ranks,
freezing included; one-hot layers without all-reduces; DDP without find_unused_parameters."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from norm_plugins.layers import SparseSwitchableNorm, SyncSparseSwitchableNorm
from norm_plugins.ops.sparsestmax import vertex_distance
from norm_plugins.testing import run_distributed

CHANNELS = 6
SPATIAL = (3, 4)


def make_layer(cls, **kwargs):
    """Group SSN (G = 2), in float64: the variance ratios of group 0 one-hot from the start, the rest free."""
    layer = cls(CHANNELS, momentum=0.3, ratio_groups=2, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.randn(2, 3, generator=gen) * 0.5)
        layer.var_weight.copy_(torch.tensor([[1.5, 0.1, 0.0], [0.0, 0.1, 0.2]]))  # group 0: one-hot (IN)
        layer.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        layer.bias.copy_(torch.randn(CHANNELS, generator=gen))
    return layer.double()


def global_batch(total, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(total, CHANNELS, *SPATIAL, generator=gen, dtype=torch.float64) * 2 + 1
    g = torch.randn(total, CHANNELS, *SPATIAL, generator=gen, dtype=torch.float64)
    return x, g


def train_steps(layer, x, g):
    """Step 1 at radius 0.3 (free vectors), step 2 at 0.75 (vectors on the simplex's edges), step 3
    at the vertex: everything freezes at iteration 2. Returns the last step's output and input
    gradient, and each step's logit gradients."""
    logit_grads = []
    for iteration, radius in enumerate((0.3, 0.75, vertex_distance(3))):
        layer.set_radius(radius, iteration=iteration)
        layer.zero_grad()
        xs = x.detach().requires_grad_()
        y = layer(xs)
        (y * g).sum().backward()
        logit_grads.append((layer.mean_weight.grad.clone(), layer.var_weight.grad.clone()))
    return y.detach(), xs.grad, logit_grads


def _rank_run(rank, world, sizes, out_dir):
    x, g = global_batch(sum(sizes))
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    layer = make_layer(SyncSparseSwitchableNorm)
    y, x_grad, logit_grads = train_steps(layer, x[local], g[local])
    for step in logit_grads:  # what DDP does with parameter gradients
        for grad in step:
            dist.all_reduce(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)
    torch.save(dict(y=y, x_grad=x_grad, grads=grads, logit_grads=logit_grads, state=layer.state_dict()),
               f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
@pytest.mark.parametrize('sizes', [(1, 3), (3, 0), (0, 2, 1)], ids=['unequal2', 'zero2', 'zero3'])
def test_sync_matches_ssn_on_concatenated_batch(tmp_path, sizes):
    run_distributed(_rank_run, len(sizes), sizes, str(tmp_path))
    check_against_ssn(tmp_path, sizes)


def check_against_ssn(tmp_path, sizes):
    """The ranks' results of :func:`_rank_run` against SSN on the concatenated batch."""
    reference = make_layer(SparseSwitchableNorm)
    x, g = global_batch(sum(sizes))
    y, x_grad, logit_grads = train_steps(reference, x, g)
    assert reference.mean_fixed_at.tolist() == [2, 2] and reference.var_fixed_at.tolist() == [0, 2]
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(len(sizes))]
    torch.testing.assert_close(torch.cat([r['y'] for r in results]), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([r['x_grad'] for r in results]), x_grad, rtol=1e-9, atol=1e-10)
    for r in results:
        for ours, expected in zip(r['logit_grads'], logit_grads):
            for a, b in zip(ours, expected):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        for name, param in reference.named_parameters():
            torch.testing.assert_close(r['grads'][name], param.grad, rtol=1e-9, atol=1e-10, msg=name)
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(r['state'][name], value, rtol=1e-12, atol=1e-12, msg=name)


def _count_all_reduces(rank, world, out_dir):
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
    try:
        x, g = global_batch(3)
        local = slice(0, 2) if rank == 0 else slice(2, 3)
        counts = {}
        for mean, var in (('in', 'in'), ('ln', 'in'), ('bn', 'bn'), ('in', 'bn'), (None, None)):
            layer = make_layer(SyncSparseSwitchableNorm)
            if mean is not None:
                state = layer.state_dict()
                state['mean_fixed'] = torch.full((2,), layer.normalizers.index(mean))
                state['var_fixed'] = torch.full((2,), layer.normalizers.index(var))
                layer.load_state_dict(state)  # refreshes the host copy, as a resume does
            for training in (True, False):
                layer.train(training)
                calls.clear()
                xs = x[local].clone().requires_grad_()
                (layer(xs) * g[local]).sum().backward()
                counts[f'{mean}/{var}/{training}'] = len(calls)
    finally:
        dist.all_reduce = all_reduce
    torch.save(counts, f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
def test_one_hot_layers_without_bn_do_not_all_reduce(tmp_path):
    run_distributed(_count_all_reduces, 2, str(tmp_path))
    for rank in range(2):
        counts = torch.load(tmp_path / f'rank{rank}.pt')
        assert counts['in/in/True'] == counts['ln/in/True'] == 0
        # Batch statistics forward, their gradients backward.
        assert counts['bn/bn/True'] == counts['in/bn/True'] == counts['None/None/True'] == 2
        assert all(n == 0 for key, n in counts.items() if key.endswith('False')), counts


def _ddp_run(rank, world, out_dir):
    """Two layers, one of them one-hot (IN) and so computing IN only, inside DDP without
    find_unused_parameters: every logit still gets a gradient, so DDP's reducer completes."""
    torch.manual_seed(0)
    frozen = make_layer(SyncSparseSwitchableNorm)
    state = frozen.state_dict()
    state['mean_fixed'] = state['var_fixed'] = torch.zeros(2, dtype=torch.long)
    frozen.load_state_dict(state)
    model = nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 1).double(), frozen, nn.ReLU(),
                          nn.Conv2d(CHANNELS, CHANNELS, 1).double(), make_layer(SyncSparseSwitchableNorm))
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    x, g = global_batch(4)
    for step in range(3):
        ddp.zero_grad()
        (ddp(x[2 * rank:2 * rank + 2]) * g[2 * rank:2 * rank + 2]).sum().backward()
    torch.save({n: p.grad for n, p in model.named_parameters()}, f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_trains_one_hot_layers(tmp_path):
    run_distributed(_ddp_run, 2, str(tmp_path))
    grads = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert torch.count_nonzero(grads[0]['1.mean_weight']) == 0 and grads[0]['4.mean_weight'].abs().max() > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)
