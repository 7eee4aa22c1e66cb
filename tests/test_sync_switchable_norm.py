"""SyncSN in real gloo process groups against single-process SN on the concatenated batch."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from norm_plugins import SwitchableNorm, SyncSwitchableNorm
from norm_plugins.testing import run_distributed

CHANNELS = 6
SPATIAL = (3, 4)


def make_layer(cls, **kwargs):
    layer = cls(CHANNELS, momentum=0.3, unbiased_instance_var=kwargs.pop('unbiased', False), **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.randn(3, generator=gen))
        layer.var_weight.copy_(torch.randn(3, generator=gen))
        layer.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        layer.bias.copy_(torch.randn(CHANNELS, generator=gen))
    return layer.double()


def global_batch(total, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(total, CHANNELS, *SPATIAL, generator=gen, dtype=torch.float64) * 2 + 1
    g = torch.randn(total, CHANNELS, *SPATIAL, generator=gen, dtype=torch.float64)
    return x, g


def train_steps(layer, x, g, steps=2):
    """Two training steps (running statistics move twice), gradients of the last one."""
    for _ in range(steps):
        layer.zero_grad()
        x = x.detach().requires_grad_()
        y = layer(x)
        (y * g).sum().backward()
    return y.detach(), x.grad


def _rank_run(rank, world, sizes, out_dir):
    x, g = global_batch(sum(sizes))
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    for unbiased in (False, True):
        layer = make_layer(SyncSwitchableNorm, unbiased=unbiased)
        y, x_grad = train_steps(layer, x[local], g[local])
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        for grad in grads.values():  # what DDP does with parameter gradients
            dist.all_reduce(grad)
        torch.save(dict(y=y, x_grad=x_grad, grads=grads, buffers=dict(layer.named_buffers())),
                   f'{out_dir}/rank{rank}_{unbiased}.pt')


@pytest.mark.slow
@pytest.mark.parametrize('sizes', [(2, 2), (1, 3), (3, 0), (2, 1, 3), (0, 2, 1)],
                         ids=['equal2', 'unequal2', 'zero2', 'unequal3', 'zero3'])
def test_sync_matches_sn_on_concatenated_batch(tmp_path, sizes):
    run_distributed(_rank_run, len(sizes), sizes, str(tmp_path))
    for unbiased in (False, True):
        check_against_sn(tmp_path, sizes, unbiased)


def check_against_sn(tmp_path, sizes, unbiased):
    reference = make_layer(SwitchableNorm, unbiased=unbiased)
    x, g = global_batch(sum(sizes))
    y, x_grad = train_steps(reference, x, g)
    results = [torch.load(tmp_path / f'rank{r}_{unbiased}.pt') for r in range(len(sizes))]
    torch.testing.assert_close(torch.cat([r['y'] for r in results]), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([r['x_grad'] for r in results]), x_grad, rtol=1e-9,
                               atol=1e-10)
    for r in results:
        for name, param in reference.named_parameters():
            torch.testing.assert_close(r['grads'][name], param.grad, rtol=1e-9, atol=1e-10)
        for name, buf in reference.named_buffers():
            torch.testing.assert_close(r['buffers'][name], buf, rtol=1e-12, atol=1e-12)


def _group_run(rank, world, out_dir):
    layer = make_layer(SyncSwitchableNorm, group_size=2)
    x, g = global_batch(2 * world)
    y, _ = train_steps(layer, x[2 * rank:2 * rank + 2], g[2 * rank:2 * rank + 2], steps=1)
    torch.save(y, f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
def test_group_size_synchronizes_consecutive_ranks_only(tmp_path):
    run_distributed(_group_run, 4, str(tmp_path))
    x, g = global_batch(8)
    for group in range(2):
        reference = make_layer(SwitchableNorm)
        expected, _ = train_steps(reference, x[4 * group:4 * group + 4], g[4 * group:4 * group + 4],
                                  steps=1)
        got = torch.cat([torch.load(tmp_path / f'rank{r}.pt') for r in (2 * group, 2 * group + 1)])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_without_process_group_it_is_sn():
    sync, plain = make_layer(SyncSwitchableNorm), make_layer(SwitchableNorm)
    x, g = global_batch(3)
    for a, b in zip(train_steps(sync, x, g), train_steps(plain, x, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sync.eval()
    plain.eval()
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize('group_size', [0, -2, 1.5])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match='group_size'):
        SyncSwitchableNorm(4, group_size=group_size)


def _ddp_rank_run(rank, world, sizes, out_dir):
    x, g = global_batch(sum(sizes))
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 1).double(), make_layer(SyncSwitchableNorm))
    ddp = DistributedDataParallel(model)
    for _ in range(2):  # the running statistics move twice
        ddp.zero_grad()
        xs = x[local].clone().requires_grad_()
        (ddp(xs) * g[local]).sum().backward()
    # DDP averages the ranks' gradients; the loss of the concatenated batch sums them.
    grads = {name: p.grad * world for name, p in model.named_parameters()}
    torch.save(dict(grads=grads, x_grad=xs.grad, buffers=dict(model.named_buffers())), f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
def test_real_ddp_with_an_empty_rank_matches_sn_on_concatenated_batch(tmp_path):
    """SyncSN inside DistributedDataParallel over gloo, one rank without samples: DDP's own gradient
    reduction plus SyncSN's give the gradients and buffers of SN on the concatenated batch."""
    sizes = (1, 0, 2)
    run_distributed(_ddp_rank_run, len(sizes), sizes, str(tmp_path))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 1).double(), make_layer(SwitchableNorm))
    x, g = global_batch(sum(sizes))
    _, x_grad = train_steps(reference, x, g)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(len(sizes))]
    torch.testing.assert_close(torch.cat([r['x_grad'] for r in results]), x_grad, rtol=1e-9, atol=1e-10)
    for r in results:
        for name, param in reference.named_parameters():
            torch.testing.assert_close(r['grads'][name], param.grad, rtol=1e-9, atol=1e-10, msg=name)
        for name, buf in reference.named_buffers():
            torch.testing.assert_close(r['buffers'][name], buf, rtol=1e-12, atol=1e-12, msg=name)


def _empty_rank_run(rank, world, out_dir):
    layer = make_layer(SyncSwitchableNorm)
    x, g = global_batch(2)
    train_steps(layer, x, g, steps=1)
    before = {name: b.clone() for name, b in layer.named_buffers()}
    xs = torch.zeros(0, CHANNELS, *SPATIAL, dtype=torch.float64, requires_grad=True)
    y = layer(xs)
    y.sum().backward()
    torch.save(dict(before=before, after=dict(layer.named_buffers()), shape=tuple(y.shape)),
               f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
def test_all_ranks_empty_leaves_statistics_bit_identical(tmp_path):
    run_distributed(_empty_rank_run, 2, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f'rank{rank}.pt')
        assert result['shape'] == (0, CHANNELS, *SPATIAL)
        assert result['after']['num_batches_tracked'].item() == 1
        for name, value in result['before'].items():
            assert torch.equal(result['after'][name], value), name


def _count_all_reduces(rank, world, out_dir):
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
    try:
        x, g = global_batch(3)
        local = slice(0, 2) if rank == 0 else slice(2, 3)
        counts = {}
        for selected in ('in', 'bn', None):
            layer = make_layer(SyncSwitchableNorm)
            if selected is not None:
                with torch.no_grad():
                    for logits in (layer.mean_weight, layer.var_weight):
                        logits.copy_(torch.tensor([3.0 if k == selected else 0.0 for k in ('in', 'ln', 'bn')]))
                layer.harden()
            calls.clear()
            train_steps(layer, x[local], g[local], steps=1)
            counts[str(selected)] = len(calls)
    finally:
        dist.all_reduce = all_reduce
    torch.save(counts, f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
def test_hardened_without_bn_does_not_all_reduce(tmp_path):
    run_distributed(_count_all_reduces, 2, str(tmp_path))
    for rank in range(2):
        counts = torch.load(tmp_path / f'rank{rank}.pt')
        assert counts['in'] == 0
        assert counts['bn'] == 2 and counts['None'] == 2  # statistics forward, their gradients backward
