"""SSN and SyncSSN: SN's float64 formula with SparsestMax ratios, gradcheck, freezing, the state-dict
layout, the statistics a one-hot layer computes, and host reads."""
import itertools

import pytest
import torch

from norm_plugins.layers import SparseSwitchableNorm, SwitchableNorm, SyncSparseSwitchableNorm
from norm_plugins.layers import switchable_norm as sn_module
from norm_plugins.layers.sparse_switchable_norm import refresh_frozen
from norm_plugins.layers.switchable_norm import NORMALIZERS
from norm_plugins.ops.sparsestmax import sparsestmax, vertex_distance
from test_switchable_norm import reference_sn, sample

SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(NORMALIZERS, r)]


def make_ssn(channels=6, cls=SparseSwitchableNorm, radius=0.3, seed=0, **kwargs):
    """An SSN with random logits (scale 0.6: mostly free vectors at moderate radii), affine and radius."""
    layer = cls(channels, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logits in layer._mixture_logits().values():
            logits.copy_(torch.randn(logits.shape, generator=gen) * 0.6)
        if layer.affine:
            layer.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
            layer.bias.copy_(torch.randn(channels, generator=gen))
    layer.set_radius(radius)
    return layer


def expected_ratios(layer, logits=None):
    """(mean, var) ratios as (G, K) float64 tensors: one-hot for frozen vectors, else SparsestMax of
    the logits at the layer's radius."""
    k = len(layer.normalizers)
    out = []
    for vector in ('mean', 'var'):
        name = vector if not layer.tied else 'mean'
        z = (logits or {}).get(f'{name}_weight', getattr(layer, f'{name}_weight')).double().reshape(-1, k)
        ratios = sparsestmax(z, layer.radius.double())
        fixed = getattr(layer, f'{name}_fixed')
        for g, choice in enumerate(fixed.tolist()):
            if choice >= 0:
                ratios = ratios.index_put((torch.tensor(g),), torch.eye(k, dtype=torch.float64)[choice])
        out.append(ratios)
    return out


def per_channel_dict(layer, ratios):
    """{normalizer: (1, C, 1) ratios} for :func:`reference_sn`, channels in contiguous groups."""
    c = layer.num_features
    rows = ratios.repeat_interleave(c // ratios.shape[0], 0)
    return {name: rows[:, i].view(1, c, 1) for i, name in enumerate(layer.normalizers)}


def reference_of(layer, x, running=None, logits=None):
    mean, var = expected_ratios(layer, logits)
    return reference_sn(x, per_channel_dict(layer, mean), per_channel_dict(layer, var), layer.weight, layer.bias,
                        layer.eps, layer.unbiased_instance_var, running)


@pytest.mark.parametrize('normalizers', SUBSETS)
@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('groups', [1, 3])
@pytest.mark.parametrize('radius', [0.0, 0.35, 0.75])
def test_forward_matches_sn_formula_with_sparsestmax_ratios(normalizers, tied, groups, radius):
    layer = make_ssn(normalizers=normalizers, tied=tied, ratio_groups=groups, radius=radius, momentum=0.25)
    x = sample((3, 6, 4, 5))
    y = layer(x)
    expected, mu_bn, var_bn = reference_of(layer, x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    if 'bn' in normalizers:
        torch.testing.assert_close(layer.running_mean.double(), 0.25 * mu_bn, rtol=1e-5, atol=1e-6)
    layer.eval()
    x2 = sample((3, 6, 4, 5), seed=2)
    running = (layer.running_mean, layer.running_var) if 'bn' in normalizers else None
    torch.testing.assert_close(layer(x2).double(), reference_of(layer, x2, running)[0], rtol=1e-5, atol=1e-5)


def test_ratios_and_mixture_ratios_are_the_sparsestmax_ratios():
    layer = make_ssn(normalizers=('in', 'bn'), ratio_groups=2, radius=0.5)
    mean, var = expected_ratios(layer)
    ratios = layer.ratios()
    torch.testing.assert_close(torch.stack([ratios['mean'][k] for k in layer.normalizers], -1).double(), mean)
    full_mean, full_var = layer.mixture_ratios()
    assert full_mean.shape == (2, 3) and torch.count_nonzero(full_mean[:, 1]) == 0
    torch.testing.assert_close(full_var[:, [0, 2]].double(), var)


@pytest.mark.parametrize('radius', [0.1, 0.45])
@pytest.mark.parametrize('config', [dict(), dict(tied=True), dict(ratio_groups=2), dict(normalizers=('in', 'ln')),
                                    dict(unbiased_instance_var=True)])
@pytest.mark.parametrize('training', [True, False])
def test_gradcheck(radius, config, training):
    """Through the layer and SparsestMax into the logits, away from SparsestMax's kinks."""
    layer = make_ssn(4, radius=radius, seed=3, **config).double()
    if layer.track_running_stats:
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    x = sample((3, 4, 3, 2), dtype=torch.float64).requires_grad_()
    params = list(layer.parameters())
    assert torch.autograd.gradcheck(lambda inp, *_: layer(inp), (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_match_autograd_of_the_formula():
    """The layer's gradients against autograd through SparsestMax and the plain formula in float64."""
    layer = make_ssn(5, radius=0.4, ratio_groups=5, unbiased_instance_var=True).double()
    x = sample((4, 5, 3, 3), dtype=torch.float64).requires_grad_()
    g = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    inputs = {'x': x.detach().clone().requires_grad_(),
              **{n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}}
    mean, var = expected_ratios(layer, {k: inputs[k] for k in ('mean_weight', 'var_weight')})
    y, _, _ = reference_sn(inputs['x'], per_channel_dict(layer, mean), per_channel_dict(layer, var), inputs['weight'],
                           inputs['bias'], layer.eps, layer.unbiased_instance_var)
    (y * g).sum().backward()
    ours = {'x': x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    for name, tensor in inputs.items():
        torch.testing.assert_close(ours[name], tensor.grad, rtol=1e-9, atol=1e-10, msg=name)
    assert layer.mean_weight.grad.abs().max() > 0


def _one_hot(index, k=3):
    return torch.eye(k)[index]


def test_a_one_hot_vector_freezes_and_stops_training():
    layer = make_ssn(4, radius=0.2)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, 1.5, 0.2]))  # sparsemax already one-hot (LN)
        layer.var_weight.copy_(torch.tensor([0.3, 0.2, 0.1]))  # free at r = 0.2
    layer.set_radius(0.2, iteration=7)
    x = sample((2, 4, 3, 3))
    layer.eval()
    layer(x)
    assert layer.mean_fixed.tolist() == [-1], 'eval does not freeze'
    layer.train()
    layer(x).sum().backward()
    assert layer.mean_fixed.tolist() == [1] and layer.mean_fixed_at.tolist() == [7]
    assert layer.var_fixed.tolist() == [-1] and layer.var_fixed_at.tolist() == [-1]
    assert torch.count_nonzero(layer.mean_weight.grad) == 0 and layer.var_weight.grad.abs().max() > 0
    # The logits may move (momentum, weight decay); the frozen choice does not.
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([3.0, 0.0, 0.0]))
    assert torch.equal(layer.mixture_ratios()[0], _one_hot(1))
    layer.set_radius(0.7, iteration=9)
    layer(x)
    assert layer.mean_fixed_at.tolist() == [7] and layer.var_fixed.tolist() == [-1]
    layer.set_radius(vertex_distance(3), iteration=12)
    layer(x)
    assert layer.var_fixed.tolist() == [0] and layer.var_fixed_at.tolist() == [12]
    assert torch.equal(layer.mixture_ratios()[1], _one_hot(0))


def test_group_vectors_freeze_independently():
    layer = make_ssn(4, ratio_groups=2, tied=True, radius=0.1)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [0.3, 0.2, 0.1]]))
    layer(sample((2, 4, 3, 3)))
    assert layer.mean_fixed.tolist() == [2, -1] and 'var_fixed' not in layer.state_dict()
    layer.mean_weight.sum().backward()  # logits stay leaves
    x = sample((2, 4, 3, 3))
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert torch.count_nonzero(layer.mean_weight.grad[0]) == 0 and layer.mean_weight.grad[1].abs().max() > 0


def test_state_dict_layout_round_trip_and_cache():
    src = make_ssn(6, ratio_groups=2, radius=0.5)
    with torch.no_grad():
        src.mean_weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 1.5]]))
        src.var_weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]))
    src.set_radius(0.5, iteration=3)
    src(sample((2, 6, 4, 4)))
    state = src.state_dict()
    assert set(state) == {'weight', 'bias', 'mean_weight', 'var_weight', 'running_mean', 'running_var',
                          'num_batches_tracked', 'radius', 'mean_fixed', 'var_fixed', 'mean_fixed_at', 'var_fixed_at'}
    assert state['radius'].dtype == torch.float32 and state['radius'].shape == ()
    for key in ('mean_fixed', 'var_fixed', 'mean_fixed_at', 'var_fixed_at'):
        assert state[key].dtype == torch.long and state[key].shape == (2,)
    assert state['mean_fixed'].tolist() == [2, 2] and state['var_fixed'].tolist() == [2, 0]
    assert state['mean_fixed_at'].tolist() == [3, 3]
    dst = SparseSwitchableNorm(6, ratio_groups=2)
    assert dst._selected_normalizer() is None
    dst.load_state_dict(state)
    assert dst._uses_batch_moments() and dst._selected_normalizer() is None  # IN and BN chosen
    for name, value in state.items():
        assert torch.equal(dst.state_dict()[name], value), name
    src.eval()
    dst.eval()
    x = sample((2, 6, 4, 4), seed=5)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    single = SparseSwitchableNorm(6, ratio_groups=2)
    single.load_state_dict({**state, 'var_fixed': torch.tensor([2, 2])})
    assert single._selected_normalizer() == 'bn'


def test_layout_of_the_other_configurations():
    assert SparseSwitchableNorm(4).mean_fixed.shape == (1,)
    tied = SparseSwitchableNorm(4, tied=True)
    assert {'var_weight', 'var_fixed', 'var_fixed_at'}.isdisjoint(tied.state_dict())
    one = SparseSwitchableNorm(4, normalizers=('bn',))
    assert one.mean_fixed.tolist() == [0] and one.mean_fixed_at.tolist() == [-1]
    assert one._selected_normalizer() == 'bn'
    two = SparseSwitchableNorm(4, normalizers=('in', 'ln'))
    assert two.mean_weight.shape == (2,) and 'running_mean' not in two.state_dict()
    assert 'iteration' not in two.state_dict()


def test_reset_parameters_frees_the_vectors():
    layer = make_ssn(4, radius=vertex_distance(3))
    layer(sample((2, 4, 3, 3)))
    refresh_frozen([layer])
    assert layer._all_frozen
    layer.reset_parameters()
    assert layer.mean_fixed.tolist() == [-1] and layer.var_fixed_at.tolist() == [-1] and not layer._all_frozen
    assert torch.equal(layer.mean_weight, torch.ones(3))


def test_harden_freezes_every_vector_to_its_argmax():
    layer = make_ssn(4, ratio_groups=2, radius=0.2)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.1]]))
        layer.var_weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [0.2, 0.2, 0.1]]))  # ties: the first
    layer(sample((2, 4, 3, 3)))  # var group 0 freezes in training (iteration unknown: -1)
    layer.set_radius(0.2, iteration=40)
    assert layer.harden() is layer
    assert layer.mean_fixed.tolist() == [1, 0] and layer.var_fixed.tolist() == [2, 0]
    assert layer.mean_fixed_at.tolist() == [40, 40] and layer.var_fixed_at.tolist() == [-1, 40]
    assert [name for name, _ in layer.named_parameters()] == ['weight', 'bias', 'mean_weight', 'var_weight']
    assert layer._all_frozen


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="type='SN', hard_ratios=True"):
        SparseSwitchableNorm(4, hard_ratios=True)
    with pytest.raises(ValueError, match="type='SN', hard_ratios=True"):
        SyncSparseSwitchableNorm(4, hard_ratios=True)
    layer = SparseSwitchableNorm(4)
    for bad in (-0.1, float('nan'), float('inf'), '0.5', True, torch.tensor(0.5)):
        with pytest.raises(ValueError, match='radius must be a finite number >= 0'):
            layer.set_radius(bad)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match='iteration must be an int >= 0 or None'):
            layer.set_radius(0.1, iteration=bad)
    with pytest.raises(ValueError, match='ratio_groups=4 does not divide'):
        SparseSwitchableNorm(6, ratio_groups=4)


class _Calls:
    """The normalizers and batch-statistics mode of every SwitchableNormFunction call."""

    def __init__(self, monkeypatch):
        self.specs = []
        original = sn_module.SwitchableNormFunction.apply

        def record(*args):
            self.specs.append(args[-1])
            return original(*args)

        monkeypatch.setattr(sn_module.SwitchableNormFunction, 'apply', record)


def _frozen(choices_mean, choices_var, **kwargs):
    """An SSN whose vectors are frozen to the given normalizer names, loaded from a state dict (which
    refreshes the host cache, as a resume does)."""
    layer = make_ssn(4, **kwargs)
    state = layer.state_dict()
    state['mean_fixed'] = torch.tensor([layer.normalizers.index(c) for c in choices_mean])
    state['var_fixed'] = torch.tensor([layer.normalizers.index(c) for c in choices_var])
    layer.load_state_dict(state)
    return layer


@pytest.mark.parametrize('training', [True, False])
def test_one_hot_layers_compute_only_what_they_select(monkeypatch, training):
    calls = _Calls(monkeypatch)
    x = sample((3, 4, 3, 3))
    for mean, var, normalizers, batch in ((['bn'], ['bn'], ('bn',), training), (['in'], ['in'], ('in',), False),
                                          (['ln'], ['ln'], ('ln',), False),
                                          (['in'], ['ln'], NORMALIZERS, False),
                                          (['in'], ['bn'], NORMALIZERS, training)):
        layer = _frozen(mean, var).train(training)
        stats = layer.running_mean.clone()
        calls.specs.clear()
        y = layer(x)
        (spec,) = calls.specs
        assert spec.normalizers == normalizers and spec.use_batch_stats == batch, (mean, var)
        assert torch.equal(layer.running_mean, stats) != (batch and training)
        torch.testing.assert_close(y.double(), reference_of(layer, x, None if training else
                                                            (layer.running_mean, layer.running_var))[0],
                                   rtol=1e-5, atol=1e-5)
    groups = _frozen(['bn', 'bn'], ['bn', 'bn'], ratio_groups=2).train(training)
    calls.specs.clear()
    groups(x)
    assert calls.specs[0].normalizers == ('bn',)


def test_selected_layer_keeps_every_logit_in_the_graph():
    """A one-normalizer layer still gives its logits (zero) gradients: DDP without
    find_unused_parameters needs a gradient for every parameter."""
    layer = _frozen(['bn'], ['bn'])
    layer(sample((2, 4, 3, 3))).square().sum().backward()
    for logits in (layer.mean_weight, layer.var_weight):
        assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_the_hook_refresh_enables_the_fast_path_with_one_read(monkeypatch):
    layers = [make_ssn(4, radius=vertex_distance(3), seed=s) for s in range(3)]
    for layer in layers:
        layer(sample((2, 4, 3, 3)))
        assert not layer._all_frozen  # the host copy lags until a refresh
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda t: reads.append(t.numel()) or tolist(t))
    refresh_frozen(layers)
    assert reads == [6]  # mean and var choice of 3 layers, one read
    assert all(layer._all_frozen for layer in layers)


def test_forward_and_backward_never_read_a_tensor_on_the_host(monkeypatch):
    """Freezing during forward, partly frozen layers, eval: no tensor becomes a Python value."""
    layers = [make_ssn(4, radius=0.5, momentum=None), make_ssn(4, radius=0.7, ratio_groups=2, tied=True),
              _frozen(['bn'], ['bn']), _frozen(['in'], ['ln']), make_ssn(4, normalizers=('bn',))]
    with torch.no_grad():
        layers[0].mean_weight.copy_(torch.tensor([2.0, 0.0, 0.0]))

    def refuse(*args):
        raise AssertionError('a tensor was read on the host')

    for name in ('item', 'tolist', '__float__', '__int__', '__bool__', '__index__'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for layer in layers:
        for training in (True, False):
            layer.train(training)
            for x in (sample((2, 4, 3, 3)).requires_grad_(), torch.zeros(0, 4, 3, 3, requires_grad=True)):
                layer(x).sum().backward()
    monkeypatch.undo()
    assert layers[0].mean_fixed.tolist() == [0]


def test_sync_without_process_group_is_ssn():
    sync, plain = make_ssn(cls=SyncSparseSwitchableNorm, radius=0.5), make_ssn(radius=0.5)
    x = sample((3, 6, 3, 3))
    for training in (True, False):
        sync.train(training)
        plain.train(training)
        torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    for a, b in zip(sync.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_sn_checkpoint_loads_with_strict_false_and_keeps_free_vectors():
    sn = SwitchableNorm(4)
    layer = SparseSwitchableNorm(4)
    missing, unexpected = layer.load_state_dict(sn.state_dict(), strict=False)
    assert set(missing) == {'radius', 'mean_fixed', 'var_fixed', 'mean_fixed_at', 'var_fixed_at'} and not unexpected
    assert not layer._all_frozen

