"""Group SN (``ratio_groups=G``): each of G contiguous channel groups mixes IN, LN and BN with its own
ratios, the statistics keeping their definitions (LN over all channels), against the float64
formula of tests/test_switchable_norm.py with per-channel ratios, by gradcheck, and over gloo."""
import itertools

import pytest
import torch

from norm_plugins.layers import SwitchableNorm, SyncSwitchableNorm
from norm_plugins.layers.switchable_norm import NORMALIZERS
from norm_plugins.testing import run_distributed
from test_switchable_norm import reference_sn, sample

SUBSETS = [s for r in (2, 3) for s in itertools.combinations(NORMALIZERS, r)]


def randomized(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.mean_weight, layer.var_weight):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=gen) * 2)
        if layer.affine:
            layer.weight.copy_(torch.rand(layer.num_features, generator=gen) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=gen))
    return layer


def channel_ratios(logits, normalizers, channels):
    """{normalizer: (1, C, 1) ratios}: each group's softmax, repeated over its channels."""
    ratios = torch.softmax(logits.double(), -1).repeat_interleave(channels // logits.shape[0], 0)
    return {name: ratios[:, i].view(1, channels, 1) for i, name in enumerate(normalizers)}


def reference_of(layer, x, running=None, logits=None):
    """The float64 formula with the layer's per-group ratios (or given ``logits``, with gradients)."""
    logits = logits or {name: getattr(layer, name) for name in ('mean_weight', 'var_weight')}
    mean_r = channel_ratios(logits['mean_weight'], layer.normalizers, layer.num_features)
    var_r = mean_r if layer.tied else channel_ratios(logits['var_weight'], layer.normalizers, layer.num_features)
    weight = bias = None
    if layer.affine:
        weight, bias = logits.get('weight', layer.weight), logits.get('bias', layer.bias)
    return reference_sn(x, mean_r, var_r, weight, bias, layer.eps, layer.unbiased_instance_var, running)


@pytest.mark.parametrize('groups', [2, 3])
@pytest.mark.parametrize('normalizers', SUBSETS)
@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('unbiased', [False, True])
def test_forward_matches_reference_train_and_eval(groups, normalizers, tied, unbiased):
    layer = randomized(SwitchableNorm(6, normalizers=normalizers, tied=tied, unbiased_instance_var=unbiased,
                                      ratio_groups=groups, momentum=0.25))
    assert layer.mean_weight.shape == (groups, len(normalizers))
    x = sample((3, 6, 4, 5))
    expected, mu_bn, var_bn = reference_of(layer, x)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    if 'bn' in normalizers:
        torch.testing.assert_close(layer.running_mean.double(), 0.25 * mu_bn, rtol=1e-5, atol=1e-6)
    layer.eval()
    x2 = sample((3, 6, 4, 5), seed=2)
    running = (layer.running_mean, layer.running_var) if 'bn' in normalizers else None
    expected, _, _ = reference_of(layer, x2, running)
    torch.testing.assert_close(layer(x2).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('training', [True, False])
def test_gradcheck(tied, training):
    layer = randomized(SwitchableNorm(4, ratio_groups=2, tied=tied, unbiased_instance_var=True)).double()
    layer.running_mean.uniform_(-1, 1)
    layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    x = sample((3, 4, 3, 2), dtype=torch.float64).requires_grad_()

    def fn(inp, *_):
        return layer(inp)

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_match_autograd_of_reference():
    layer = randomized(SwitchableNorm(6, ratio_groups=3, unbiased_instance_var=True)).double()
    x = sample((4, 6, 3, 3), dtype=torch.float64).requires_grad_()
    g = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    leaves = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    expected, _, _ = reference_of(layer, x_ref, logits=leaves)
    (expected * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-9, atol=1e-10, msg=name)


def test_one_group_is_the_papers_layer_and_layout():
    """G = 1 keeps (K,) logits and equals SN's output; G = C/G groups of one ratio vector each."""
    plain, grouped = SwitchableNorm(4), SwitchableNorm(4, ratio_groups=1)
    assert grouped.state_dict().keys() == plain.state_dict().keys()
    assert grouped.mean_weight.shape == (3,) and 'ratio_groups' not in repr(grouped)
    same = SwitchableNorm(4, ratio_groups=2)
    with torch.no_grad():
        same.mean_weight.copy_(plain.mean_weight.expand(2, 3))
        same.var_weight.copy_(plain.var_weight.expand(2, 3))
    x = sample((2, 4, 3, 3))
    torch.testing.assert_close(same(x), plain(x), rtol=1e-6, atol=1e-6)
    assert 'ratio_groups=2' in repr(same)


def test_ratios_and_mixture_ratios_are_per_group():
    layer = randomized(SwitchableNorm(6, ratio_groups=3, normalizers=('in', 'bn')))
    ratios = layer.ratios()
    assert ratios['mean']['in'].shape == (3,)
    torch.testing.assert_close(ratios['mean']['in'] + ratios['mean']['bn'], torch.ones(3))
    mean, var = layer.mixture_ratios()
    assert mean.shape == var.shape == (3, 3)
    torch.testing.assert_close(mean[:, 1], torch.zeros(3))  # no LN: 0 in the (IN, LN, BN) layout


def test_harden_selects_per_group_and_single_selection_skips_statistics():
    layer = SwitchableNorm(4, ratio_groups=2)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([[0., 0., 5.], [0., 5., 0.]]))
        layer.var_weight.copy_(torch.tensor([[0., 0., 5.], [0., 0., 5.]]))
    layer.harden()
    assert [torch.argmax(t, -1).tolist() for t in (layer.mean_weight, layer.var_weight)] == [[2, 1], [2, 2]]
    assert layer._selected_normalizer() is None and layer._uses_batch_moments()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([[-1e4, 0., -1e4], [-1e4, 0., -1e4]]))
        layer.var_weight.copy_(layer.mean_weight)
    layer.load_state_dict(layer.state_dict())  # hardening state is refreshed on load
    assert layer._selected_normalizer() == 'ln' and not layer._uses_batch_moments()
    x = sample((2, 4, 3, 3))
    ln = torch.nn.functional.group_norm(x, 1, eps=layer.eps)
    torch.testing.assert_close(layer(x), ln * layer.weight.view(1, 4, 1, 1) + layer.bias.view(1, 4, 1, 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('groups', [0, -1, 4, 2.0, True])
def test_bad_ratio_groups_name_the_fix(groups):
    with pytest.raises(ValueError, match='ratio_groups'):
        SwitchableNorm(6, ratio_groups=groups)


def test_loading_a_one_group_checkpoint_into_groups_fails_clearly():
    with pytest.raises(RuntimeError, match='size mismatch for mean_weight'):
        SwitchableNorm(4, ratio_groups=2).load_state_dict(SwitchableNorm(4).state_dict())


CHANNELS, SPATIAL = 6, (3, 4)


def _make(cls):
    return randomized(cls(CHANNELS, ratio_groups=3, momentum=0.3, unbiased_instance_var=True)).double()


def _batch(total):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(total, CHANNELS, *SPATIAL, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randn(total, CHANNELS, *SPATIAL, generator=gen, dtype=torch.float64)


def _steps(layer, x, g):
    for _ in range(2):
        layer.zero_grad()
        x = x.detach().requires_grad_()
        y = layer(x)
        (y * g).sum().backward()
    return y.detach(), x.grad


def sync_rank(rank, world, sizes, out_dir):
    import torch.distributed as dist
    x, g = _batch(sum(sizes))
    local = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    layer = _make(SyncSwitchableNorm)
    y, x_grad = _steps(layer, x[local], g[local])
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)
    torch.save(dict(y=y, x_grad=x_grad, grads=grads, buffers=dict(layer.named_buffers())),
               f'{out_dir}/rank{rank}.pt')


def check_sync_against_sn(out_dir, sizes):
    reference = _make(SwitchableNorm)
    x, g = _batch(sum(sizes))
    y, x_grad = _steps(reference, x, g)
    results = [torch.load(f'{out_dir}/rank{r}.pt') for r in range(len(sizes))]
    torch.testing.assert_close(torch.cat([r['y'] for r in results]), y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat([r['x_grad'] for r in results]), x_grad, rtol=1e-8, atol=1e-9)
    for r in results:
        for name, p in reference.named_parameters():
            torch.testing.assert_close(r['grads'][name], p.grad, rtol=1e-8, atol=1e-9, msg=name)
        for name, b in reference.named_buffers():
            torch.testing.assert_close(r['buffers'][name], b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.slow
def test_sync_group_sn_over_gloo_with_unequal_ranks(tmp_path):
    sizes = (2, 0, 1)
    run_distributed(sync_rank, len(sizes), sizes, str(tmp_path))
    check_sync_against_sn(tmp_path, sizes)
