"""Batch-Channel Normalization on the four row-wise passes of :mod:`norm_plugins.ops.rowwise`.

Rows are ``x[n, c, :]`` of x viewed as (N, C, L), with mean ``m`` and biased variance ``v``. Channel c
lies in group k of K = C / G channels. Given per-channel statistics ``mean_c``, ``var_c`` (constants:
running statistics or micro-batch estimates; or the batch's, derived from (m, v) and summed over
ranks), BCN (Eq. 40, 42) is affine in x per row. With ``u = x - m`` (the row centred on its mean)::

    a_c   = weight_c / sqrt(var_c + eps)              x' = a_c u + h_nc     (Eq. 40, per row)
    h_nc  = a_c (m_nc - mean_c) + bias_c              mean of x' over row (n, c)
    mu_nk = mean_{c in k} h_nc,   hc_nc = h_nc - mu_nk
    var_nk = mean_{c in k} (a_c^2 v_nc + hc_nc^2)     moments of x' over (n, group k)
    s_nk  = group_weight_k / sqrt(var_nk + eps)
    y     = (x - m) * A + B,   A = s a,   B = s hc + group_bias_k                           (Eq. 42)

Every difference of large numbers, ``x - m`` and ``m - mean_c``, is taken before any scaling, so
where |mean| / std is large the result stays within 2x of BatchNorm's error (``x * A + B`` would
cancel). What remains is the float32 rounding of the row means ``m``, which the backward's
``(x - m)`` factor of the variance gradient sees once per row (BatchNorm once per channel).

Backward, from the row sums ``S1 = sum_l g`` and ``S2 = sum_l g u`` (one pass over g and x):

- group normalization of x' (count K L per group): ``T_nk = sum_{c in k} (a S2 + hc S1)`` is dL/ds, so
  ``d group_bias = sum_n,c S1``, ``d group_weight = sum_n T rstd_nk``, and
  ``dL/dx' = s g + (x' - mu) p1 + q1`` with ``p1 = -T s rstd_nk^2 / (K L)``,
  ``q1 = -s sum_{c in k} S1 / (K L)``;
- its row sums ``E1 = sum_l dL/dx' = s S1 + L (q1 + p1 hc)``,
  ``E2 = sum_l dL/dx' u = s S2 + p1 a L v`` give ``d bias = sum_n E1``,
  ``d weight = rstd_c sum_n (E2 + (m - mean_c) E1)``;
- dx: with constant statistics, ``dx = a dL/dx'``; with batch statistics over ``count`` elements
  per channel, BatchNorm's backward adds ``-a (F1 + rstd_c (x - mean_c) F2) / count`` with
  ``F1 = sum dL/dx'`` (= d bias) and ``F2 = sum dL/dx' (x - mean_c) rstd_c`` (= d weight), both
  summed over the synchronized ranks. Both are ``dx = g A + (x - m) P + Q``:

      P = a^2 p1 [- a rstd_c F2 / count],   Q = a (q1 + p1 hc) [- a (F1 + rstd_c (m - mean_c) F2) / count]

Only x (in its own dtype) is saved as a tensor for backward; the (N, C) coefficients are kept on the
context, so a non-reentrant checkpoint recomputes x but keeps the original forward's constants.
Double backward is not implemented and raises (:func:`.first_order.first_order_only`).
"""
from typing import Optional, Union

import torch
from torch import Tensor

from .distributed import all_reduce_sum_
from .first_order import first_order_only
from .rowwise import as_rows, row_grad_sums, row_normalize, row_normalize_backward, shaped_like

# The (N, C) coefficient math runs in float64: it costs nothing next to the passes over x, and keeps
# ``m - mean_c`` exact where |mean| / std is large (the batch mean itself comes from float64 sums).
COEFFICIENT_DTYPE = torch.float64


class BatchChannelNormFunction(torch.autograd.Function):
    """``y = (x - m) A + B`` and its hand-derived backward; see the module docstring.

    Args of ``apply``: ``x`` (N, C, *spatial), its row moments ``m``, ``v`` (N, C) and the per-channel
    statistics ``mean``, ``var`` (C), all in the accumulation dtype; ``count``: ``None`` for
    constant statistics, else the number of elements per channel they were computed from (a host
    number, or a device tensor when summed over ``group``'s ranks); the four affine parameters (or
    ``None``), ``groups``, ``eps`` and the process group (or ``None``) of the batch statistics.
    """

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, v: Tensor, mean: Tensor, var: Tensor,
                count: Optional[Union[int, Tensor]], weight: Optional[Tensor], bias: Optional[Tensor],
                group_weight: Optional[Tensor], group_bias: Optional[Tensor], groups: int, eps: float,
                group) -> Tensor:
        n, c = m.shape
        per_group = c // groups
        acc = COEFFICIENT_DTYPE
        v = v.to(acc)
        rstd_c = (var.to(acc) + eps).rsqrt()
        a = rstd_c if weight is None else rstd_c * weight.to(acc)
        d = m.to(acc) - mean.to(acc)
        h = a * d if bias is None else torch.addcmul(bias.to(acc), a, d)
        h3, hv3 = h.view(n, groups, per_group), (a * a * v).view(n, groups, per_group)
        hc3 = h3 - h3.mean(-1, keepdim=True)
        rstd_g = (hv3.mean(-1) + hc3.square().mean(-1) + eps).rsqrt()
        s = rstd_g if group_weight is None else rstd_g * group_weight.to(acc)
        scale = s.unsqueeze(-1) * a.view(groups, per_group)
        shift = s.unsqueeze(-1) * hc3
        if group_bias is not None:
            shift = shift + group_bias.to(acc).view(groups, 1)
        y = row_normalize(as_rows(x), m, scale.view(n, c).to(m.dtype), shift.view(n, c).to(m.dtype))

        ctx.save_for_backward(x)
        ctx.constants = (m, v, rstd_c, a, d, hc3.view(n, c), s, rstd_g, count, groups, group)
        ctx.param_dtypes = [p.dtype if p is not None else None
                            for p in (weight, bias, group_weight, group_bias)]
        return shaped_like(y, x)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        x, = ctx.saved_tensors
        m, v, rstd_c, a, d, hc, s, rstd_g, count, groups, group = ctx.constants
        n, c = m.shape
        x3, g3 = as_rows(x), as_rows(grad)
        spatial = x3.shape[2]
        s1, s2 = (t.to(COEFFICIENT_DTYPE) for t in row_grad_sums(g3, x3, m))

        per_group = c // groups
        group_count = spatial * per_group
        t = (a * s2 + hc * s1).view(n, groups, per_group).sum(-1)
        p1 = -t * s * rstd_g.square() / group_count
        q1 = -s * s1.view(n, groups, per_group).sum(-1) / group_count
        s_c, p1_c, q1_c = (z.repeat_interleave(per_group, dim=1) for z in (s, p1, q1))
        e1 = s_c * s1 + spatial * (q1_c + p1_c * hc)
        e2 = s_c * s2 + spatial * p1_c * a * v
        d_bias = e1.sum(0)
        d_xhat = rstd_c * (e2 + d * e1).sum(0)  # dL/d weight, = F2 before the sum over ranks

        dx = None
        if ctx.needs_input_grad[0]:
            p = a * a * p1_c
            q = a * (q1_c + p1_c * hc)
            if count is not None:
                f = torch.stack([d_bias, d_xhat])
                all_reduce_sum_(f, group)
                per_count = count.clamp(min=1).to(f.dtype) if isinstance(count, Tensor) else max(count, 1)
                f1, f2 = a * f[0] / per_count, a * rstd_c * f[1] / per_count
                p = p - f2
                q = q - f1 - d * f2
            dx = row_normalize_backward(g3, x3, m, *(t.to(m.dtype) for t in (s_c * a, p, q)))
            dx = shaped_like(dx, x)

        d_group_weight = (t * rstd_g).sum(0)
        d_group_bias = s1.view(n, groups, per_group).sum((0, 2))
        grads = [grad.to(dtype) if wanted else None for grad, dtype, wanted in
                 zip((d_xhat, d_bias, d_group_weight, d_group_bias), ctx.param_dtypes, ctx.needs_input_grad[6:10])]
        return (dx, None, None, None, None, None, *grads, None, None, None)

