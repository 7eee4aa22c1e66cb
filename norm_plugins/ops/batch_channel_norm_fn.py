"""Fused Batch-Channel Normalization: one statistics pass and one output pass over x.

For ``x`` of shape (N, C, L) with per-(n, c) moments ``m``, ``v`` (over L), Eq. 40 is a per-channel
affine map ``x' = a_c x + b_c`` with ``a = weight / sqrt(var_c + eps)``, ``b = bias - mean_c a``, so the
moments of x' per (n, c) are ``a m + b`` and ``a^2 v``, and those of each (n, group) follow by the law
of total variance. The group normalization with its per-group affine (Eq. 42) is then again affine in
x per (n, c)::

    y = A_nc x + B_nc,   A = gamma_g rstd_ng a_c,   B = gamma_g rstd_ng (b_c - mu_ng) + beta_g

``A`` and ``B`` are small functions of (m, v) and the parameters (plus, for batch statistics,
mean_c/var_c derived from m, v, possibly summed over ranks). Forward needs ``m, v`` (one pass) and
writes y into the buffer the moments kernel leaves (one pass). Backward takes ``sum_l g`` and
``sum_l g x`` per (n, c) (one pass), obtains the gradients of (m, v) and of the parameters by
differentiating the small (N, C) graph again, and writes ``dx = g A + x P + Q`` (one pass). Only x
and (N, C) tensors are saved.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from .distributed import all_reduce_sum
from .moments import batch_sums, moments_from_sums


def _group_coefficients(m: Tensor, v: Tensor, a: Tensor, b: Tensor, group_weight: Optional[Tensor],
                        group_bias: Optional[Tensor], groups: int, eps: float):
    """(A, B) of ``y = A x + B`` from per-(n, c) moments and the per-channel map ``a x + b``."""
    n, c = m.shape
    per_group = c // groups
    mean_nc = (a * m + b).view(n, groups, per_group)  # moments of x' per (n, c)
    var_nc = (a * a * v).view(n, groups, per_group)
    mu = mean_nc.mean(-1, keepdim=True)
    var = var_nc.mean(-1, keepdim=True) + (mean_nc - mu).square().mean(-1, keepdim=True)
    rstd = (var + eps).rsqrt()
    if group_weight is not None:
        rstd = rstd * group_weight.view(1, groups, 1)
    scale = rstd.expand(n, groups, per_group).reshape(n, c)
    shift = (rstd * (b.view(1, groups, per_group) - mu)).reshape(n, c)
    if group_bias is not None:
        shift = shift + group_bias.repeat_interleave(per_group)
    return scale * a, shift


def coefficients_from_constants(m: Tensor, v: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                                bias: Optional[Tensor], group_weight: Optional[Tensor],
                                group_bias: Optional[Tensor], *, groups: int, eps: float):
    """Eq. 40 with given per-channel statistics (micro-batch estimates, running statistics)."""
    a = (var + eps).rsqrt()
    if weight is not None:
        a = a * weight
    b = -mean * a if bias is None else bias - mean * a
    return _group_coefficients(m, v, a, b, group_weight, group_bias, groups, eps) + (None,)


def coefficients_from_batch(m: Tensor, v: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            group_weight: Optional[Tensor], group_bias: Optional[Tensor], *, spatial: int,
                            groups: int, eps: float, group):
    """Eq. 40 with the statistics of the batch, summed over ``group``'s ranks (differentiably).

    The third result is ``(mean, var, count)`` of the (global) batch, for the running statistics.
    """
    sums = all_reduce_sum(batch_sums(m, v, spatial), group)
    mean, var = moments_from_sums(sums, m.dtype)
    scale, shift, _ = coefficients_from_constants(m, v, mean, var, weight, bias, group_weight, group_bias,
                                                  groups=groups, eps=eps)
    return scale, shift, (mean, var, sums[-1])


class BatchChannelNormFunction(torch.autograd.Function):
    """``y = A(m, v, *params) x + B(m, v, *params)``; see the module docstring.

    ``m``, ``v`` are the per-(n, c) mean and biased variance of ``x`` (from :func:`moments`, without
    gradients), ``scale``, ``shift`` = ``coefficients(m, v, *params)`` evaluated in forward; backward
    differentiates ``coefficients`` again on (N, C) tensors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, v: Tensor, scale: Tensor, shift: Tensor, out: Tensor,
                coefficients: Callable, *params: Optional[Tensor]) -> Tensor:
        # ``out``: a spare (N, C, L) buffer from the moments kernel, overwritten with y.
        y = torch.addcmul(shift.unsqueeze(-1), x, scale.unsqueeze(-1), out=out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, m, v, *params)
        ctx.coefficients = coefficients
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, m, v, *params = ctx.saved_tensors
        wanted = ctx.needs_input_grad[7:]
        spatial = x.shape[2]
        g = grad.to(m.dtype)
        sum_g = g.sum(2)
        sum_gx = torch.einsum('ncl,ncl->nc', g, x.to(m.dtype))
        with torch.enable_grad():
            m_, v_ = m.detach().requires_grad_(), v.detach().requires_grad_()
            leaves = [p.detach().requires_grad_(w) if p is not None else None for p, w in zip(params, wanted)]
            scale, shift, _ = ctx.coefficients(m_, v_, *leaves)
            inputs = [m_, v_] + [p for p in leaves if p is not None and p.requires_grad]
            grads = torch.autograd.grad((scale, shift), inputs, (sum_gx, sum_g), allow_unused=True)
        param_grads = iter(grads[2:])
        d_params = [next(param_grads) if p is not None and p.requires_grad else None for p in leaves]
        dx = None
        if ctx.needs_input_grad[0]:
            d_m, d_v = (torch.zeros_like(m) if d is None else d for d in grads[:2])
            # m = mean_l x, v = mean_l (x - m)^2: dm/dx = 1/L, dv/dx = 2 (x - m) / L.
            p = d_v * (2.0 / spatial)
            q = d_m / spatial - p * m
            dx = torch.addcmul(q.unsqueeze(-1), x.to(m.dtype), p.unsqueeze(-1))
            dx.addcmul_(g, scale.detach().unsqueeze(-1))
            dx = dx.to(x.dtype)
        return (dx, None, None, None, None, None, None, *d_params)
