"""SparsestMax against a brute-force float64 projection (a fine grid of the simplex, refined around
its best point), gradcheck away from the kinks, and the one-hot test it shares with the layer."""
import math

import numpy as np
import pytest
import torch

from norm_plugins.ops.sparsestmax import one_hot_choice, sparsestmax, vertex_distance


def brute_force_projection(z, r):
    """argmin ||p - z||^2 over simplex points with ||p - u|| >= min(r, r_K), by enumeration.

    K = 2: 2 * 10^5 points of the segment and its two points at distance r from u. K = 3: the
    minimizer lies inside the feasible set, on the circle ||p - u|| = r or on the simplex's edges, so the candidates are a grid of step 1/300,
    10^5 points of the circle and of each edge, all kept where feasible; the best is then
    refined by grids 10 times finer over a window of 8 old steps around it, recentred until it stops
    moving. Returns the point, its objective, and the best objective among candidates 0.05 or more
    away from it (how clearly the minimizer is unique).
    """
    k = len(z)
    u = np.full(k, 1.0 / k)
    radius = min(r, math.sqrt((k - 1) / k)) - 1e-12  # the vertices lie exactly at r_K

    def feasible(points):
        return points[(np.linalg.norm(points - u, axis=1) >= radius) & (points >= -1e-15).all(1)]

    def objective(points):
        return ((points - z) ** 2).sum(1)

    if k == 2:
        t = np.linspace(0, 1, 2 * 10**5 + 1)
        circle = u + min(r, math.sqrt(0.5)) * np.array([[1, -1], [-1, 1]]) / np.sqrt(2)
        candidates = feasible(np.concatenate([np.stack([t, 1 - t], 1), circle]))
    else:
        n = 300
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing='ij')
        keep = i + j <= n
        grid = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], 1) / n
        angle = np.linspace(0, 2 * np.pi, 10**5, endpoint=False)[:, None]
        a, b = np.array([1, -1, 0]) / np.sqrt(2), np.array([1, 1, -2]) / np.sqrt(6)
        circle = u + min(r, math.sqrt(2 / 3)) * (np.cos(angle) * a + np.sin(angle) * b)
        t = np.linspace(0, 1, 10**5)[:, None]
        edges = [t * np.eye(3)[e] + (1 - t) * np.eye(3)[f] for e, f in ((0, 1), (1, 2), (0, 2))]
        candidates = feasible(np.concatenate([grid, circle, *edges]))
    values = objective(candidates)
    p, value = candidates[values.argmin()], values.min()
    if k == 3:
        step = 1.0 / n
        for _ in range(4):
            offsets = np.linspace(-8 * step, 8 * step, 161)
            for _ in range(50):
                a, b = np.meshgrid(p[0] + offsets, p[1] + offsets, indexing='ij')
                local = feasible(np.stack([a.ravel(), b.ravel(), 1 - a.ravel() - b.ravel()], 1))
                local_values = objective(local)
                if not len(local) or local_values.min() >= value:
                    break
                p, value = local[local_values.argmin()], local_values.min()
            step /= 10
    far = np.linalg.norm(candidates - p, axis=1) >= 0.05
    runner_up = values[far].min() if far.any() else np.inf
    return p, value, runner_up


def ours(z, r):
    return sparsestmax(torch.tensor(z, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)).numpy()


def check_against_brute_force(z, r):
    z = np.asarray(z, dtype=np.float64)
    k = len(z)
    p = ours(z, r)
    expected, expected_value, runner_up = brute_force_projection(z, r)
    value = ((p - z) ** 2).sum()
    # Feasible: on the simplex, outside the ball.
    assert abs(p.sum() - 1) < 1e-12 and (p >= 0).all(), p
    assert np.linalg.norm(p - 1.0 / k) >= min(r, math.sqrt((k - 1) / k)) - 1e-9, p
    # Optimal: no grid point is better, and the grid's best is (nearly) as good.
    assert value <= expected_value + 1e-12, (z, r, p, expected)
    assert expected_value - value < 1e-6, (z, r, p, expected)
    if runner_up - expected_value > 1e-3:  # a unique minimizer: the same point
        np.testing.assert_allclose(p, expected, atol=2e-4, err_msg=f'z={z}, r={r}')
    return p


# Each region of the solution (see the module docstring), K = 3 and K = 2.
CASES_3 = {
    'sparsemax-inside': ([0.3, 0.1, -0.2], 0.2),
    'sparsemax-on-edge': ([1.0, 0.8, -5.0], 0.4),
    'sparsemax-one-hot': ([2.0, 0.5, 0.0], 0.3),
    'circle': ([0.3, 0.2, 0.1], 0.3),
    'circle-to-edge': ([0.3, 0.2, 0.1], 0.75),
    'on-edge-to-circle-end': ([1.0, 0.8, -5.0], 0.6),
    'just-below-vertex': ([0.2, 0.1, 0.0], vertex_distance(3) - 1e-3),
    'at-vertex': ([0.2, 0.1, 0.0], vertex_distance(3)),
    'beyond-vertex': ([0.2, 0.1, 0.0], 1.0),  # the authors' schedule ends at r = 1
    'radius-zero': ([0.4, -0.3, 0.2], 0.0),
}
CASES_2 = {
    'sparsemax-inside': ([0.3, 0.1], 0.1),
    'circle': ([0.3, 0.1], 0.4),
    'sparsemax-one-hot': ([0.0, 1.5], 0.2),
    'beyond-vertex': ([0.3, 0.1], 1.0),
}


@pytest.mark.parametrize('case', list(CASES_3))
def test_k3_regions_match_brute_force(case):
    check_against_brute_force(*CASES_3[case])


@pytest.mark.parametrize('case', list(CASES_2))
def test_k2_regions_match_brute_force(case):
    check_against_brute_force(*CASES_2[case])


@pytest.mark.parametrize('k', [2, 3])
def test_random_logits_and_radii_match_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(40 if k == 3 else 30):
        z = rng.normal(0, rng.choice([0.2, 1.0, 3.0]), size=k)
        r = rng.uniform(0, 1.05) * vertex_distance(k)
        check_against_brute_force(z, r)


def test_set_valued_cases_return_a_minimizer():
    """Equal logits (every point of the circle is a minimizer) and tied top logits with the circle
    leaving the simplex (two arc ends): a feasible point with the optimal value, towards the first
    normalizer."""
    for z, r in (([1.0, 1.0, 1.0], 0.3), ([1.0, 1.0, 1.0], 0.6), ([0.5, 0.5, 0.0], 0.6), ([2.0, 2.0], 0.3)):
        p = check_against_brute_force(z, r)
        assert p[0] == p.max() and p[0] > p[1]


def test_k3_edge_is_the_authors_closed_form():
    """On the edge, p_j0 = 1/2 + sqrt(r^2 - 1/6)/sqrt(2) is the authors' (1 + sqrt(2) r sin(acos(1/(sqrt(6) r))))/2."""
    for r in (0.45, 0.6, 0.75, 0.81):
        p = ours([1.0, 0.8, -5.0], r)
        authors = (1 + math.sqrt(2) * r * math.sin(math.acos(1 / (math.sqrt(6) * r)))) / 2
        np.testing.assert_allclose(p, [authors, 1 - authors, 0.0], rtol=0, atol=1e-12)


def test_k1_is_one_and_the_vertex_ends_every_vector_one_hot():
    ones = sparsestmax(torch.randn(4, 1), torch.tensor(0.5))
    assert torch.equal(ones, torch.ones(4, 1))
    for k in (2, 3):
        z = torch.randn(50, k)
        p = sparsestmax(z, torch.tensor(vertex_distance(k)))
        assert torch.equal(p, torch.nn.functional.one_hot(z.argmax(-1), k).float())


def _sparsemax(z):
    """Plain float64 sparsemax (sort and threshold), for the kink distances."""
    s = np.sort(z)[::-1]
    ks = np.arange(1, len(z) + 1)
    rho = ks[1 + ks * s > np.cumsum(s)].max()
    return np.maximum(z - (s[:rho].sum() - 1) / rho, 0)


def _kink_distance(z, r):
    """How far (z, r) lies from every place where the piecewise-linear map changes its piece."""
    k = len(z)
    s = np.sort(z)[::-1]
    gaps = [np.sum(s[:j] - s[j]) for j in range(1, k)]
    w = _sparsemax(z)
    q = w - 1.0 / k
    distances = [abs(g - 1) for g in gaps] + [np.diff(s).__abs__().min(), abs(np.linalg.norm(q) - r),
                                               abs(r - vertex_distance(k))]
    if np.linalg.norm(q) < r and k == 3:
        distances.append(abs((1.0 / k + r * q / np.linalg.norm(q)).min()))
    return min(distances)


@pytest.mark.parametrize('k', [2, 3])
def test_gradcheck_away_from_kinks(k):
    rng = np.random.default_rng(10 + k)
    checked = 0
    while checked < 25:
        z = rng.normal(0, 0.6, size=k)
        r = rng.uniform(0, 1) * vertex_distance(k)
        if _kink_distance(z, r) < 1e-3:
            continue
        logits = torch.tensor(z, requires_grad=True)
        radius = torch.tensor(r, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda t: sparsestmax(t, radius), (logits,), eps=1e-7, atol=1e-7)
        checked += 1
    for z, r in list(CASES_3.values()) + list(CASES_2.values()):
        if len(z) == k and _kink_distance(np.asarray(z), r) >= 1e-3:
            logits = torch.tensor(z, dtype=torch.float64, requires_grad=True)
            radius = torch.tensor(r, dtype=torch.float64)
            assert torch.autograd.gradcheck(lambda t: sparsestmax(t, radius), (logits,), eps=1e-7, atol=1e-7)


def test_gradients_of_the_pieces():
    """The circle piece has Jacobian (r/|q|)(I - qq^T/|q|^2) J_sparsemax (0 for K = 2); the edge and
    one-hot pieces have none; batches of vectors (groups) are independent."""
    z = torch.tensor([[0.3, 0.2, 0.1], [0.3, 0.2, 0.1], [2.0, 0.5, 0.0]], dtype=torch.float64)
    for r, expect_zero in ((0.3, [False, False, True]), (0.75, [True, True, True])):
        jac = torch.autograd.functional.jacobian(lambda t: sparsestmax(t, torch.tensor(r, dtype=torch.float64)), z)
        for i in range(3):
            block = jac[i, :, i, :]
            assert torch.count_nonzero(block) == 0 if expect_zero[i] else block.abs().max() > 0.1
            others = [j for j in range(3) if j != i]
            assert torch.count_nonzero(jac[i, :, others, :]) == 0
    w = z[0] - (z[0].sum() - 1) / 3
    q = w - 1 / 3
    eye = torch.eye(3, dtype=torch.float64)
    expected = 0.3 / q.norm() * (eye - torch.outer(q, q) / q.square().sum()) @ (eye - 1 / 3)
    jac = torch.autograd.functional.jacobian(lambda t: sparsestmax(t, torch.tensor(0.3, dtype=torch.float64)), z[0])
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    z2 = torch.tensor([0.3, 0.1], dtype=torch.float64)
    jac2 = torch.autograd.functional.jacobian(lambda t: sparsestmax(t, torch.tensor(0.4, dtype=torch.float64)), z2)
    assert jac2.abs().max() < 1e-12


def test_one_hot_choice_agrees_with_the_ratios():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 3):
        for scale in (0.3, 1.0, 3.0):
            z = torch.randn(400, k, generator=gen) * scale
            z[:20] = z[:20].round()  # ties
            for r in (0.0, 0.3, 0.6, 0.8, vertex_distance(k), 1.0):
                radius = torch.tensor(r)
                p = sparsestmax(z, radius)
                one_hot, index = one_hot_choice(z, radius)
                assert torch.equal(one_hot, (p > 0).sum(-1) == 1)
                assert torch.equal(index, p.argmax(-1)) and torch.equal(index, z.argmax(-1))
                assert torch.equal(p[one_hot], torch.nn.functional.one_hot(index[one_hot], k).float())


def test_exact_support_boundary_is_one_hot():
    """A top logit exactly 1 above the second: sparsemax gives (1, 0, 0), and that counts as one-hot."""
    z = torch.tensor([[1.25, 0.25, -1.0], [0.5, -0.5, -0.75]])
    p = sparsestmax(z, torch.tensor(0.0))
    assert torch.equal(p, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    assert one_hot_choice(z, torch.tensor(0.0))[0].all()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_logits_and_radius(dtype):
    """Half logits are computed in float32; a half radius set to r_K still reaches the vertex."""
    z = torch.tensor([0.3, 0.2, 0.1], dtype=dtype)
    radius = torch.tensor(vertex_distance(3), dtype=dtype)
    assert float(radius) != vertex_distance(3)  # rounded
    p = sparsestmax(z, radius)
    assert p.dtype == torch.float32 and torch.equal(p, torch.tensor([1.0, 0.0, 0.0]))
    assert one_hot_choice(z, radius)[0]
    torch.testing.assert_close(sparsestmax(z, torch.tensor(0.3, dtype=dtype)),
                               sparsestmax(z.float(), torch.tensor(0.3, dtype=dtype).float()))


def test_equal_logits_with_rounding_stay_on_the_simplex():
    """w = u up to rounding: the direction is taken in the plane, so the result stays on the simplex."""
    for value in (1.0, 0.1, -3.7, 1e3):
        p = sparsestmax(torch.full((3,), value), torch.tensor(0.3))
        assert abs(float(p.sum()) - 1) < 1e-6 and (p >= 0).all()
        np.testing.assert_allclose(np.linalg.norm(p.numpy() - 1 / 3), 0.3, rtol=1e-5)
    p = sparsestmax(torch.tensor([1.0, 1.0, 1.0 - 2**-23]), torch.tensor(0.3))  # one ulp apart
    assert abs(float(p.sum()) - 1) < 1e-6 and (p >= 0).all()


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match='1 <= K <= 3'):
        sparsestmax(torch.zeros(4), torch.tensor(0.1))
    with pytest.raises(ValueError, match='1 <= K <= 3'):
        sparsestmax(torch.zeros(2, 0), torch.tensor(0.1))
    with pytest.raises(ValueError, match='0-dim floating-point tensor'):
        sparsestmax(torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match='0-dim floating-point tensor'):
        one_hot_choice(torch.zeros(3), torch.tensor([0.1]))


def test_no_host_reads(monkeypatch):
    def refuse(*args):
        raise AssertionError('a tensor was read on the host')

    z = torch.randn(4, 3, requires_grad=True)
    for name in ('item', 'tolist', '__float__', '__int__', '__bool__', '__index__'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for r in (0.0, 0.4, 0.75, 0.9):
        sparsestmax(z, torch.tensor(r)).square().sum().backward()
        one_hot_choice(z, torch.tensor(r))
