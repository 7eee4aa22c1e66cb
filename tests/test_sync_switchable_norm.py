"""SyncSN in real gloo process groups against single-process SN on the concatenated batch."""
import pytest
import torch
import torch.distributed as dist

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
