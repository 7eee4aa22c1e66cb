"""Autograd function of Switchable Normalization (SN paper Eq. 2-5 and Appendix A).

For ``x`` of shape (N, C, L) (spatial positions flattened into L) and ratios ``r`` (means) and
``r'`` (variances) over (IN, LN, BN)::

    mu_in, var_in   = moments of x[n, c, :]                         (one pass over x)
    mu_ln, var_ln   = moments over (c, l), derived from mu_in, var_in (Eq. 4)
    mu_bn, var_bn   = moments over (n, l), derived likewise, summed over ranks when synchronized
    mean = sum_k r_k mu_k,  var = sum_k r'_k var_k
    y    = (x - mean) * weight / sqrt(var + eps) + bias

With ``k = L / (L - 1)`` (``unbiased=True``, the authors' released code) the instance variance is
scaled by ``k`` before LN and BN variances are derived from it; with one spatial position the
correction is undefined and ``k = 1`` is used, so the variance of a 1x1 map is 0, never NaN.

Only ``x`` and (N, C) statistics are saved. Backward makes one pass over ``grad`` and ``x`` for the
per-(n, c) sums ``sum_l g`` and ``sum_l g * x``, then writes ``dx = g * a + x * P + Q`` with (N, C)
coefficients ``a, P, Q`` that collect every path through the statistics.
"""
from typing import Optional

import torch
from torch import Tensor

from .distributed import all_reduce_sum_
from .moments import batch_sums, instance_moments, moments_from_sums


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class SwitchableNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean_ratio: Tensor,
                var_ratio: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                use_batch_stats: bool, momentum: float, eps: float, unbiased: bool, group) -> Tensor:
        acc = _accumulation_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            n, c, spatial = x.shape
            xs = x.to(acc)
            mu_in, var_in, buffer = instance_moments(xs)
            k = spatial / (spatial - 1) if unbiased and spatial > 1 else 1.0
            if k != 1.0:
                var_in = var_in * k
            mu_ln = mu_in.mean(1, keepdim=True)
            var_ln = (var_in + (mu_in - mu_ln).square()).mean(1, keepdim=True)

            count = None
            if use_batch_stats:
                sums = all_reduce_sum_(batch_sums(mu_in, var_in, spatial), group)
                mu_bn, var_bn = moments_from_sums(sums, acc)
                count = sums[-1].clamp(min=1)
                if running_mean is not None:
                    running_mean.lerp_(mu_bn.to(running_mean.dtype), momentum)
                    running_var.lerp_(var_bn.to(running_var.dtype), momentum)
            elif running_mean is not None:
                mu_bn, var_bn = running_mean.to(acc), running_var.to(acc)
            else:
                mu_bn = var_bn = x.new_zeros(c, dtype=acc)

            rm, rv = mean_ratio.to(acc), var_ratio.to(acc)
            mean = rm[0] * mu_in + rm[1] * mu_ln + rm[2] * mu_bn
            var = rv[0] * var_in + rv[1] * var_ln + rv[2] * var_bn
            rstd = (var + eps).rsqrt()
            scale = rstd if weight is None else rstd * weight.to(acc)
            shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
            y = buffer if buffer.dtype == x.dtype else torch.empty_like(x)
            torch.addcmul(shift.unsqueeze(-1), xs, scale.unsqueeze(-1), out=y)

        ctx.save_for_backward(x, weight, mean_ratio, var_ratio, mu_in, var_in, mu_ln, var_ln, mu_bn,
                              var_bn, mean, rstd, count)
        ctx.meta = (k, use_batch_stats, group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x, weight, mean_ratio, var_ratio, mu_in, var_in, mu_ln, var_ln, mu_bn, var_bn, mean, rstd,
         count) = ctx.saved_tensors
        k, use_batch_stats, group = ctx.meta
        acc = mu_in.dtype
        with torch.autocast(x.device.type, enabled=False):
            n, c, spatial = x.shape
            xs, gs = x.to(acc), grad.to(acc)
            sum_g = gs.sum(2)
            sum_gx = torch.einsum('ncl,ncl->nc', gs, xs)
            sum_g_xhat = (sum_gx - mean * sum_g) * rstd  # sum_l g * (x - mean) * rstd

            w = torch.ones_like(rstd) if weight is None else weight.to(acc).expand_as(rstd)
            scale = w * rstd
            d_mean = -scale * sum_g
            d_var = -0.5 * w * rstd.pow(2) * sum_g_xhat

            rm, rv = mean_ratio.to(acc), var_ratio.to(acc)
            d_mean_ratio = torch.stack([(d_mean * mu_in).sum(), (d_mean * mu_ln).sum(),
                                        (d_mean * mu_bn).sum()])
            d_var_ratio = torch.stack([(d_var * var_in).sum(), (d_var * var_ln).sum(),
                                       (d_var * var_bn).sum()])

            d_mu_in, d_var_in = rm[0] * d_mean, rv[0] * d_var
            d_mu_ln = rm[1] * d_mean.sum(1, keepdim=True)
            d_var_ln = rv[1] * d_var.sum(1, keepdim=True)
            inv_l, inv_cl = 1.0 / spatial, 1.0 / (c * spatial)
            p = 2 * k * (inv_l * d_var_in + inv_cl * d_var_ln)
            q = (inv_l * d_mu_in + inv_cl * d_mu_ln - 2 * inv_l * k * d_var_in * mu_in
                 - 2 * inv_cl * d_var_ln * ((k - 1) * mu_in + mu_ln))
            if use_batch_stats:
                # The batch moments depend on every rank's x: their gradients are summed over ranks.
                d_bn = torch.cat([rm[2] * d_mean.sum(0), rv[2] * d_var.sum(0)]).double()
                all_reduce_sum_(d_bn, group)
                d_mu_bn, d_var_bn = (d_bn / count).to(acc).chunk(2)
                p = p + 2 * k * d_var_bn
                q = q + d_mu_bn - 2 * d_var_bn * ((k - 1) * mu_in + mu_bn)

            dx = torch.addcmul(q.unsqueeze(-1), xs, p.unsqueeze(-1))
            dx.addcmul_(gs, scale.unsqueeze(-1))

            d_weight = d_bias = None
            if weight is not None:  # affine: weight and bias come together
                d_weight, d_bias = sum_g_xhat.sum(0).to(weight.dtype), sum_g.sum(0).to(weight.dtype)
        return (dx.to(x.dtype), d_weight, d_bias, d_mean_ratio.to(mean_ratio.dtype),
                d_var_ratio.to(var_ratio.dtype), None, None, None, None, None, None, None)
