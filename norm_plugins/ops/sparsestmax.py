"""SparsestMax (Shao et al., "SSN: Learning Sparse Switchable Normalization via SparsestMax",
CVPR 2019): the ratio vectors of sparse switchable normalization, for K <= 3 normalizers.

For logits ``z`` in R^K and a radius ``r``, with the probability simplex D = {p : p >= 0, sum p = 1},
its centre ``u = 1/K`` and the distance of its vertices from the centre
``r_K = sqrt((K - 1) / K)`` (r_1 = 0, r_2 = 1/sqrt(2) ~ 0.707, r_3 = sqrt(2/3) ~ 0.816)::

    SparsestMax(z; r) = argmin_p ||p - z||^2   over p in D with ||p - u|| >= min(r, r_K)

the Euclidean projection onto the simplex outside the open ball of radius r around its centre.
r = 0 is sparsemax (Martins & Astudillo, 2016); r >= r_K leaves only the vertices (one-hot vectors).

Exact solution, K = 2 and K = 3 (``H`` is the plane sum p = 1, ``z_H`` the projection of z onto it):

1. ``w = sparsemax(z)``: with z sorted descending, the support holds the first rho entries, where
   rho is the number of k with ``sum_{i<k} (z_(i) - z_(k)) < 1``; ``tau = (sum_{i<=rho} z_(i) - 1) /
   rho`` and ``w = max(z - tau, 0)``.
2. ``||w - u|| >= r``: w is feasible and the minimizer over all of D, so it is the answer.
3. Otherwise the answer lies on the circle S = {p in H : ||p - u|| = r}: the objective is convex
   with its minimum over D at w, so it decreases along the segment from any feasible point to w,
   which crosses S. On S, ``||p - z||^2 = const - 2 <p - u, z_H - u>``: the answer maximizes
   ``<p - u, z_H - u>`` over S within D. With ``q = w - u``:

   - K = 2: S holds two points, both in D (r < r_2): ``p = u + r q / ||q||``, the one on the side of
     the larger logit (w and z_H lie on the same side of u).
   - K = 3, ``p = u + r q / ||q|| >= 0``: w is inside D, so z_H = w, and p is the maximizer over
     the whole circle.
   - K = 3, that point has a negative entry (only possible for r > 1/sqrt(6), the radius of the
     inscribed circle): the circle leaves D through the edge opposite the smallest entry j2, and
     ``z_H - u`` points into that gap between the circle's arcs in D (when w lies on the edge, z_H
     lies beyond it, further into the gap). The maximizer is the arc end nearest to it: on the
     edge, on the side of the largest entry j0, at distance r from u. The edge's midpoint lies at
     1/sqrt(6) from u and the edge runs along (e_j0 - e_j1) / sqrt(2), so::

         p_j0 = 1/2 + sqrt(r^2 - 1/6) / sqrt(2),   p_j1 = 1 - p_j0,   p_j2 = 0

     (the authors' ``(1 + sqrt(2) r sin(arccos(1 / (sqrt(6) r)))) / 2`` is the same number).
   - ``q = 0`` (w = u, e.g. equal logits), r > 0: every point of S within D is a minimizer; the one
     towards the vertex of the largest logit is returned, ``p = u + r (e_j0 - u) / r_K``.
4. r >= r_K: the vertex ``e_j0`` of the largest logit.

Ties between logits go to the first (the order of a stable sort; ``argmax`` agrees). The result is
one-hot exactly when rho = 1 (the largest logit exceeds the second by at least 1) or r >= r_K; the
one-hot vectors are returned exactly (1 and 0s).

The centre: the authors' ``regulated_sparsemax`` hard-codes ``u = 1/3``, which is the centre of the
simplex for K = 3 only. For K = 2 (their ``using_bn=False``) the moved point ``u + r q / ||q||`` with
u = (1/3, 1/3) no longer sums to 1, and their edge branch indexes a third entry that does not exist.
The centre of the K-simplex, ``u = 1/K``, is what the problem above needs, and is used here.

Gradients (autograd through the formulas, piecewise linear in z): sparsemax's Jacobian on the
support in case 2; ``(r / ||q||) (I - q q^T / ||q||^2)`` times it in the circle case (0 for K = 2:
the point is fixed once r dominates); 0 on the edge, towards a vertex for q = 0 and at one-hot
results. There the logits receive no gradient and only the growing radius moves the ratios.
Kinks: changes of the support, ``||w - u|| = r``, the circle reaching an edge, and ties.

Everything runs on the device, without reading a tensor on the host.
"""
import math
from typing import Tuple

import torch
from torch import Tensor

MAX_NORMALIZERS = 3


def vertex_distance(k: int) -> float:
    """r_K = sqrt((K - 1) / K): the distance of the simplex's vertices from its centre, the radius
    at which every SparsestMax result is one-hot."""
    return math.sqrt((k - 1) / k)


def _check(logits: Tensor, radius: Tensor) -> int:
    k = logits.shape[-1] if logits.dim() else 0
    if not 1 <= k <= MAX_NORMALIZERS:
        raise ValueError(f'sparsestmax: the last dimension holds the K logits of one ratio vector, 1 <= K <= '
                         f'{MAX_NORMALIZERS} (the exact projection is derived for those); got shape '
                         f'{tuple(logits.shape)}')
    if not isinstance(radius, Tensor) or radius.dim() != 0 or not radius.is_floating_point():
        raise ValueError(f'sparsestmax: radius must be a 0-dim floating-point tensor on the logits\' device '
                         f'(a Python number would be copied to the device at every call), got {radius!r}')
    return k


def _sorted_support(z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(order, sorted logits, support mask in sorted order) of sparsemax, for (..., K) logits.

    Position k is in the support iff ``sum_{i<k} (z_(i) - z_(k)) < 1``; these sums grow with k. The
    one-hot test of :func:`one_hot_choice` reads the same mask, so both agree to the bit.
    """
    order = z.detach().argsort(dim=-1, descending=True, stable=True)
    zs = z.gather(-1, order)
    flat = zs.detach()
    gaps = (flat.unsqueeze(-2) - flat.unsqueeze(-1)).clamp(min=0).sum(-1)
    return order, zs, gaps < 1


def _one_hot_mask(support: Tensor, radius: Tensor, k: int) -> Tensor:
    if k == 1:
        return support[..., 0]  # always True
    # The vertex test compares in the radius's own dtype (the Python number is rounded to it), so a
    # radius set to r_K in float16 or bfloat16 counts as reaching the vertex.
    return ~support[..., 1] | (radius >= vertex_distance(k))


def sparsestmax(logits: Tensor, radius: Tensor) -> Tensor:
    """SparsestMax of each (..., K) logit vector (K <= 3) at ``radius`` (see the module docstring).

    Args:
        logits: (..., K) logits, any floating dtype; computed in at least float32.
        radius: 0-dim floating tensor, r >= 0 (values above r_K act as r_K: one-hot results).

    Returns:
        (..., K) ratios on the simplex, in ``promote_types(logits.dtype, float32)``, with gradients
        to ``logits``.
    """
    k = _check(logits, radius)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    if k == 1:
        return torch.ones_like(z) + 0 * z  # always 1; the logit stays in the graph, with gradient 0
    order, zs, support = _sorted_support(z)
    rho = support.sum(-1, keepdim=True)
    tau = (torch.where(support, zs, 0).sum(-1, keepdim=True) - 1) / rho
    w = torch.where(support, zs - tau, 0)  # sparsemax, sorted descending

    u = 1.0 / k
    r = radius.to(dtype)
    q = w - u
    dist2 = q.square().sum(-1, keepdim=True)
    # Rounding leaves q slightly off the plane sum q = 0, which the division by a small ||q|| would
    # blow up; the direction is taken in the plane. Equal logits (w = u, any direction) are decided
    # on the logits themselves, where equality is exact.
    direction = q - q.mean(-1, keepdim=True)
    norm2 = direction.square().sum(-1, keepdim=True)
    moved = (zs[..., :1] != zs[..., -1:]) & (norm2 > 0)
    # Where there is no direction the division is replaced (double-where), so no NaN reaches the
    # gradients.
    ray = u + r * direction / torch.where(moved, norm2, 1).sqrt()
    first = torch.arange(k, device=z.device) == 0
    towards_vertex = u + r * (first.to(dtype) - u) / vertex_distance(k)
    on_circle = torch.where(moved, ray, towards_vertex)
    if k == 3:
        half = (r.square() - 1.0 / 6).clamp(min=0).sqrt() / math.sqrt(2)
        edge = torch.stack([0.5 + half, 0.5 - half, torch.zeros_like(half)])
        on_circle = torch.where(on_circle[..., 2:] < 0, edge, on_circle)
    p = torch.where(dist2 < r.square(), on_circle, w)
    p = torch.where(_one_hot_mask(support, radius, k).unsqueeze(-1), first.to(dtype), p)
    return p.gather(-1, order.argsort(dim=-1))


def one_hot_choice(logits: Tensor, radius: Tensor) -> Tuple[Tensor, Tensor]:
    """``(one_hot, index)`` for (..., K) logits: whether :func:`sparsestmax` at ``radius`` is one-hot
    (a bool per vector) and the index of its largest entry (the first largest logit), without
    computing the ratios. Both on the device."""
    k = _check(logits, radius)
    order, _, support = _sorted_support(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)))
    return _one_hot_mask(support, radius, k), order[..., 0]
