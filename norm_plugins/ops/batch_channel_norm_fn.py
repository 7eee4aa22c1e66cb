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
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .backend import use_triton
from .distributed import all_reduce_sum_
from .first_order import first_order_only
from .moments import batch_sums, moments_from_sums, update_running_stats
from .rowwise import (COEFFICIENT_DTYPE, as_rows, row_grad_sums, row_grad_sums_about, row_moments, row_normalize,
                      row_normalize_backward, shaped_like)

# How the per-channel statistics are obtained: this batch's (large batch, training), the given
# constants (running statistics, or the estimates without updating them), or Algorithm 1's update
# of the estimates followed by normalization with them (micro batch, training).
MODES = ('batch', 'constant', 'estimate')


class BCNSpec(NamedTuple):
    """Host-side configuration of one BCN call: ``groups``, ``eps``; ``mode`` (one of
    :data:`MODES`); ``update``: in 'batch' mode, move the running statistics (PyTorch ``momentum``,
    ``None`` for a cumulative average); ``group``: the process group the batch sums are reduced
    over (``None``: this process)."""
    groups: int
    eps: float
    mode: str
    update: bool = False
    momentum: Optional[float] = 0.1
    group: object = None


class BatchChannelNormFunction(torch.autograd.Function):
    """``y = (x - m) A + B`` and its hand-derived backward; see the module docstring.

    Args of ``apply``: ``x`` (N, C, *spatial); the four affine parameters (or ``None``); ``mean``,
    ``var``: the constants of 'constant' mode, the estimates (updated in place) of 'estimate' mode,
    ``None`` in 'batch' mode; ``rate``: Algorithm 1's update rate (a 0-dim tensor); the running
    statistics and ``num_batches_tracked`` ('batch' mode with ``spec.update``, else ``None``); ``spec``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], group_weight: Optional[Tensor],
                group_bias: Optional[Tensor], mean: Optional[Tensor], var: Optional[Tensor], rate: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], spec: BCNSpec) -> Tensor:
        ctx.param_dtypes = [p.dtype if p is not None else None for p in (weight, bias, group_weight, group_bias)]
        ctx.spec = spec
        with torch.autocast(x.device.type, enabled=False):
            rows = as_rows(x)
            # Statistics in float32 for half inputs (upcast inside the row pass, x is not copied).
            m, v = row_moments(rows)
            spatial = rows.shape[2]
            if use_triton(rows):
                from . import triton_norms
                sums = None
                if spec.mode != 'constant':
                    estimate = spec.mode == 'estimate'
                    sums = triton_norms.batch_sums(m, v, mean if estimate else None, var if estimate else None,
                                                   spatial, False)
                    all_reduce_sum_(sums[:2 * m.shape[1] + 1], spec.group)
                centre, scale, shift, stats = triton_norms.bcn_forward(
                    m, v, sums, mean, var, rate, weight, bias, group_weight, group_bias, running_mean, running_var,
                    num_batches_tracked, spec.groups, spec.eps, spec.momentum, MODES.index(spec.mode) + 1,
                    spec.update)
                ctx.constants = (m, v, centre, stats, sums if spec.mode == 'batch' else None)
            else:
                count = None
                if spec.mode == 'batch':
                    sums = all_reduce_sum_(batch_sums(m, v, spatial), spec.group)
                    mean, var = moments_from_sums(sums, sums.dtype)
                    count = m.shape[0] * spatial if spec.group is None else sums[-1]
                    if spec.update:
                        _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                                              spec.momentum)
                elif spec.mode == 'estimate':
                    _update_estimates(mean, var, rate, m, v, spatial, spec.group)
                centre, scale, shift, ctx.constants = _coefficients(m, v, mean, var, count, weight, bias,
                                                                    group_weight, group_bias, spec)
            y = row_normalize(rows, centre, scale, shift)
        ctx.save_for_backward(x, weight, bias, group_weight)
        return shaped_like(y, x)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        x, weight, bias, group_weight = ctx.saved_tensors
        spec = ctx.spec
        with torch.autocast(x.device.type, enabled=False):
            x3, g3 = as_rows(x), as_rows(grad)
            if use_triton(x3):
                dx, grads = _triton_backward(ctx, x3, g3, weight, bias, group_weight, spec)
            else:
                dx, grads = _torch_backward(ctx, x3, g3, spec)
        if dx is not None:
            dx = shaped_like(dx, x)
        grads = [g.to(dtype) if wanted and g is not None else None for g, dtype, wanted in
                 zip(grads, ctx.param_dtypes, ctx.needs_input_grad[1:5])]
        return (dx, *grads, None, None, None, None, None, None, None)


def _coefficients(m, v, mean, var, count, weight, bias, group_weight, group_bias, spec):
    """The pass's centre (the row means rounded to v's dtype, x's accumulation dtype), ``A``,
    ``B`` (making up for the centre's rounding) and the constants backward needs (torch path)."""
    n, c = m.shape
    groups = spec.groups
    per_group = c // groups
    acc = COEFFICIENT_DTYPE
    centre = m.to(v.dtype)
    v = v.to(acc)
    rstd_c = (var.to(acc) + spec.eps).rsqrt()
    a = rstd_c if weight is None else rstd_c * weight.to(acc)
    d = m.to(acc) - mean.to(acc)
    h = a * d if bias is None else torch.addcmul(bias.to(acc), a, d)
    h3, hv3 = h.view(n, groups, per_group), (a * a * v).view(n, groups, per_group)
    hc3 = h3 - h3.mean(-1, keepdim=True)
    rstd_g = (hv3.mean(-1) + hc3.square().mean(-1) + spec.eps).rsqrt()
    s = rstd_g if group_weight is None else rstd_g * group_weight.to(acc)
    scale = s.unsqueeze(-1) * a.view(groups, per_group)
    shift = s.unsqueeze(-1) * hc3
    if group_bias is not None:
        shift = shift + group_bias.to(acc).view(groups, 1)
    scale, shift = scale.view(n, c), shift.view(n, c) + (centre - m) * scale.view(n, c)
    constants = (m, v, centre, rstd_c, a, d, hc3.view(n, c), s, rstd_g, count)
    return centre, scale.to(centre.dtype), shift.to(centre.dtype), constants


def _torch_backward(ctx, x3, g3, spec):
    m, v, centre, rstd_c, a, d, hc, s, rstd_g, count = ctx.constants
    n, c = m.shape
    groups = spec.groups
    spatial = x3.shape[2]
    s1, s2 = row_grad_sums_about(g3, x3, centre, m)

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
            all_reduce_sum_(f, spec.group)
            per_count = count.clamp(min=1).to(f.dtype) if isinstance(count, Tensor) else max(count, 1)
            f1, f2 = a * f[0] / per_count, a * rstd_c * f[1] / per_count
            p = p - f2
            q = q - f1 - d * f2
        q = q + p * (centre - m)  # the pass is centred on the rounded means
        dx = row_normalize_backward(g3, x3, centre, *(t.to(centre.dtype) for t in (s_c * a, p, q)))
    d_group_weight = (t * rstd_g).sum(0)
    d_group_bias = s1.view(n, groups, per_group).sum((0, 2))
    return dx, (d_xhat, d_bias, d_group_weight, d_group_bias)


def _triton_backward(ctx, x3, g3, weight, bias, group_weight, spec):
    from . import triton_norms
    m, v, centre, stats, sums = ctx.constants
    s1, s2 = row_grad_sums(g3, x3, centre)
    e1, e2, grp, a, p, q = triton_norms.bcn_sample_grads(s1, s2, m, v, centre, stats, weight, bias, group_weight,
                                                         spec.groups, spec.eps, x3.shape[2])
    batch = sums is not None
    sync = batch and spec.group is not None
    d_weight, d_bias, d_group_weight, d_group_bias, f = triton_norms.bcn_channel_grads(
        e1, e2, grp, m, centre, stats, weight, sums, p, q, spec.groups, spec.eps, batch, sync)
    dx = None
    if ctx.needs_input_grad[0]:
        if sync:
            all_reduce_sum_(f, spec.group)
            triton_norms.bcn_batch_terms(f, centre, stats, weight, sums, p, q, spec.eps)
        dx = row_normalize_backward(g3, x3, centre, a, p, q)
    return dx, (d_weight, d_bias, d_group_weight, d_group_bias)


@torch.no_grad()
def _update_running_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, mean: Tensor,
                          var: Tensor, count: Union[int, Tensor], momentum: Optional[float]) -> None:
    """Move the running statistics toward the batch's, on the device (no host synchronization).

    ``count``, the elements per channel, is a host int without synchronization (> 1 by the layer's
    shape check, or 0: nothing changes), else the all-reduced tensor: a global batch with at most
    one element per channel leaves the statistics and ``num_batches_tracked`` untouched.
    """
    if isinstance(count, int):
        if count == 0:
            return
        valid, correction = None, count / (count - 1)
    else:
        valid = count > 1
        correction = (count / (count - 1).clamp(min=1)).to(var.dtype)
    # The variance is stored unbiased, as BatchNorm stores it.
    update_running_stats(running_mean, running_var, num_batches_tracked, mean, var * correction, momentum, valid)


@torch.no_grad()
def _update_estimates(estimated_mean: Tensor, estimated_var: Tensor, rate: Tensor, m: Tensor, v: Tensor,
                      spatial: int, group) -> None:
    """Steps 1-4 of Algorithm 1 from the per-(n, c) moments, averaged over the synchronized ranks;
    a batch empty on every rank leaves the estimates unchanged (masked on the device)."""
    if group is None and m.shape[0] == 0:
        return
    channels = m.shape[1]
    sums = all_reduce_sum_(batch_sums(m, v, spatial, centre=estimated_mean), group)
    total = sums[-1].clamp(min=1)
    mean = sums[:channels] / total
    sq_distance = sums[channels:2 * channels] / total  # from the previous estimated mean
    for buffer, batch in ((estimated_mean, mean), (estimated_var, sq_distance)):
        updated = torch.lerp(buffer, batch.to(buffer.dtype), rate.to(buffer.dtype))
        buffer.copy_(updated if group is None else torch.where(sums[-1] > 0, updated, buffer))
