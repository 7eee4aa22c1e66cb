"""Autograd function of Switchable Normalization (SN paper Eq. 2-5 and Appendix A), on the four
row-wise passes of :mod:`norm_plugins.ops.rowwise`.

For ``x`` of shape (N, C, L) (spatial positions flattened into L) and ratios ``r`` (means) and
``r'`` (variances) over (IN, LN, BN)::

    mu_in, var_in   = moments of x[n, c, :]                           (pass 1: row_moments)
    mu_ln, var_ln   = moments over (c, l), derived from mu_in, var_in (Eq. 4)
    mu_bn, var_bn   = moments over (n, l), derived likewise, summed over ranks when synchronized
    M = sum_k r_k mu_k,  V = sum_k r'_k var_k,  s = 1 / sqrt(V + eps)
    y = (x - M) * (weight * s) + bias                                 (pass 2: row_normalize)

With ``k = L / (L - 1)`` (``unbiased=True``, the authors' released code) the instance variance is
scaled by ``k`` before LN and BN variances are derived from it; with one spatial position the
correction is undefined and ``k = 1`` is used, so the variance of a 1x1 map is 0, never NaN.

Backward (hand-derived; ``a = weight * s``, all sums over l)::

    Sg = sum g,  Sgc = sum g (x - M)                                   (pass 3: row_grad_sums)
    dM = -a Sg,  dV = -a s^2 Sgc / 2                       per (n, c): dL/dM, dL/dV
    d var_in, d var_ln, d var_bn = r'_0 dV, r'_1 sum_c dV, r'_2 sum_n dV   (means alike with r)
    dx = g a + (x - M) P + Q                                           (pass 4: row_normalize_backward)
    P  = 2k (d var_in / L + d var_ln / (C L) + d var_bn / count)
    Q  = d mu_in / L + d mu_ln / (C L) + d mu_bn / count + P (M - mu_in)
         + 2 d var_ln (mu_in - mu_ln) / (C L) + 2 d var_bn (mu_in - mu_bn) / count

using d var_in / dx = 2k (x - mu_in) / L, d var_ln / dx = 2 (k (x - mu_in) + mu_in - mu_ln) / (C L)
and likewise for BN with ``count`` = N L (over all ranks). Every full-size pass is centred on ``M``,
so nothing cancels when |mean| / std is large. Only ``x`` (in its own dtype) and (N, C) statistics
are saved. Double backward is not implemented and raises (:func:`.first_order.first_order_only`).
"""
from typing import Optional

import torch
from torch import Tensor

from .distributed import all_reduce_sum_
from .first_order import first_order_only
from .moments import batch_sums, moments_from_sums, update_running_stats
from .rowwise import (accumulation_dtype, row_grad_sums, row_moments, row_normalize,
                      row_normalize_backward)


class SwitchableNormFunction(torch.autograd.Function):
    """``y = SN(x)`` for ``x`` of shape (N, C, L); see the module docstring for the math.

    ``use_batch_stats``: BN moments from this batch (all-reduced over ``group``); otherwise from
    ``running_mean``/``running_var``, or none (zeros) when those are ``None``. ``update_stats``:
    move the running statistics towards the batch moments and count the batch in
    ``num_batches_tracked`` (``momentum=None``: cumulative average), on the device and only when the
    batch (over all ranks) holds elements.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean_ratio: Tensor,
                var_ratio: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], use_batch_stats: bool, update_stats: bool,
                momentum: Optional[float], eps: float, unbiased: bool, group) -> Tensor:
        acc = accumulation_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            _, c, spatial = x.shape
            mu_in, var_in = row_moments(x)
            k = spatial / (spatial - 1) if unbiased and spatial > 1 else 1.0
            if k != 1.0:
                var_in = var_in * k
            mu_ln = mu_in.mean(1, keepdim=True)
            var_ln = (var_in + (mu_in - mu_ln).square()).mean(1, keepdim=True)

            count = None
            if use_batch_stats:
                sums = all_reduce_sum_(batch_sums(mu_in, var_in, spatial), group)
                mu_bn, var_bn = moments_from_sums(sums, acc)
                count = sums[-1]
                if update_stats:
                    # A batch without elements (over all ranks) changes nothing, as in BatchNorm.
                    update_running_stats(running_mean, running_var, num_batches_tracked, mu_bn, var_bn,
                                         momentum, valid=count > 0)
            elif running_mean is not None:
                mu_bn, var_bn = running_mean.to(acc), running_var.to(acc)
            else:
                mu_bn = var_bn = mu_in.new_zeros(c)

            rm, rv = mean_ratio.to(acc), var_ratio.to(acc)
            mean = rm[0] * mu_in + rm[1] * mu_ln + rm[2] * mu_bn
            var = rv[0] * var_in + rv[1] * var_ln + rv[2] * var_bn
            rstd = (var + eps).rsqrt()
            scale = rstd if weight is None else rstd * weight.to(acc)
            shift = torch.zeros_like(scale) if bias is None else bias.to(acc).expand_as(scale)
            y = row_normalize(x, mean, scale, shift)

        ctx.save_for_backward(x, weight, mean_ratio, var_ratio, mu_in, var_in, mu_ln, var_ln, mu_bn,
                              var_bn, mean, rstd, count)
        ctx.meta = (k, group)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        (x, weight, mean_ratio, var_ratio, mu_in, var_in, mu_ln, var_ln, mu_bn, var_bn, mean, rstd,
         count) = ctx.saved_tensors
        k, group = ctx.meta
        with torch.autocast(x.device.type, enabled=False):
            sum_g, sum_gc = row_grad_sums(grad, x, mean)
            a = rstd if weight is None else rstd * weight.to(rstd.dtype)
            d_mean = -a * sum_g
            d_var = -0.5 * a * rstd.square() * sum_gc

            d_mean_ratio = torch.stack([(d_mean * mu_in).sum(), (d_mean * mu_ln).sum(),
                                        (d_mean * mu_bn).sum()])
            d_var_ratio = torch.stack([(d_var * var_in).sum(), (d_var * var_ln).sum(),
                                       (d_var * var_bn).sum()])
            dx = None
            if ctx.needs_input_grad[0]:
                dx = _input_grad(grad, x, mean_ratio.to(rstd.dtype), var_ratio.to(rstd.dtype), mu_in, mu_ln,
                                 mu_bn, mean, a, d_mean, d_var, count, k, group)
            d_weight = d_bias = None
            if weight is not None:  # affine: weight and bias come together
                d_weight = (sum_gc * rstd).sum(0).to(weight.dtype)
                d_bias = sum_g.sum(0).to(weight.dtype)
        return (dx, d_weight, d_bias, d_mean_ratio.to(mean_ratio.dtype), d_var_ratio.to(var_ratio.dtype),
                None, None, None, None, None, None, None, None, None)


def _input_grad(grad, x, rm, rv, mu_in, mu_ln, mu_bn, mean, a, d_mean, d_var, count, k, group):
    """``dx = g a + (x - M) P + Q`` with the (N, C) coefficients of the module docstring; ``count``
    (elements per channel over all ranks) is ``None`` when the BN moments were constants."""
    _, c, spatial = x.shape
    inv_l, inv_cl = 1.0 / spatial, 1.0 / (c * spatial)
    d_var_in, d_var_ln = rv[0] * d_var, rv[1] * d_var.sum(1, keepdim=True)
    p = 2 * k * (inv_l * d_var_in + inv_cl * d_var_ln)
    q = (inv_l * rm[0] * d_mean + inv_cl * rm[1] * d_mean.sum(1, keepdim=True)
         + 2 * inv_cl * d_var_ln * (mu_in - mu_ln))
    if count is not None:
        # The batch moments depend on every rank's x: their gradients are summed over ranks.
        d_bn = torch.cat([rm[2] * d_mean.sum(0), rv[2] * d_var.sum(0)]).double()
        all_reduce_sum_(d_bn, group)
        d_mu_bn, d_var_bn = (d_bn / count.clamp(min=1)).to(a.dtype).chunk(2)
        p = p + 2 * k * d_var_bn
        q = q + d_mu_bn + 2 * d_var_bn * (mu_in - mu_bn)
    q = q + p * (mean - mu_in)
    return row_normalize_backward(grad, x, mean, a, p, q)

