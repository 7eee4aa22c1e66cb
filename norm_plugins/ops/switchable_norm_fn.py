"""Autograd function of Switchable Normalization (SN paper Eq. 2-5 and Appendix A), on the four
row-wise passes of :mod:`norm_plugins.ops.rowwise`.

For ``x`` of shape (N, C, L) (spatial positions flattened into L) and per-channel ratios ``r_c``
(means) and ``r'_c`` (variances) over (IN, LN, BN); channel c takes the ratios of its group when the
C channels are split into G contiguous groups (group SN; G = 1 is the SN paper's layer)::

    mu_in, var_in   = moments of x[n, c, :]                           (pass 1: row_moments)
    mu_ln, var_ln   = moments over (c, l), derived from mu_in, var_in (Eq. 4)
    mu_bn, var_bn   = moments over (n, l), derived likewise, summed over ranks when synchronized
    M = sum_k r_ck mu_k,  V = sum_k r'_ck var_k,  s = 1 / sqrt(V + eps)
    y = (x - M) * (weight * s) + bias                                 (pass 2: row_normalize)

The ratios are the softmax of the mixture logits (``spec.logits``) or given with their own gradients
(sparse SN's SparsestMax); LN statistics stay over all channels whatever the groups (Eq. 4). With
``k = L / (L - 1)`` (``unbiased=True``, the authors' released code) the instance variance is scaled
by ``k`` before LN and BN variances are derived from it; with one spatial position the correction is
undefined and ``k = 1`` is used, so the variance of a 1x1 map is 0, never NaN.

Backward (hand-derived; ``a = weight * s``, all sums over l)::

    Sg = sum g,  Sgc = sum g (x - M)                                   (pass 3: row_grad_sums)
    dM = -a Sg,  dV = -a s^2 Sgc / 2                       per (n, c): dL/dM, dL/dV
    d var_in = r'_c0 dV,  d var_ln = sum_c r'_c1 dV,  d var_bn = sum_n r'_c2 dV   (means alike with r)
    dx = g a + (x - M) P + Q                                           (pass 4: row_normalize_backward)
    P  = 2k (d var_in / L + d var_ln / (C L) + d var_bn / count)
    Q  = d mu_in / L + d mu_ln / (C L) + d mu_bn / count + P (M - mu_in)
         + 2 d var_ln (mu_in - mu_ln) / (C L) + 2 d var_bn (mu_in - mu_bn) / count
    d r_gk = sum_{n, c in g} dM mu_k,   d r'_gk = sum_{n, c in g} dV var_k

using d var_in / dx = 2k (x - mu_in) / L, d var_ln / dx = 2 (k (x - mu_in) + mu_in - mu_ln) / (C L)
and likewise for BN with ``count`` = N L (over all ranks). Every full-size pass is centred on ``M``,
so nothing cancels when |mean| / std is large. Only ``x`` (in its own dtype) and (N, C) statistics
are saved. Double backward is not implemented and raises (:func:`.first_order.first_order_only`).
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .backend import use_triton
from .distributed import all_reduce_sum_
from .first_order import first_order_only
from .moments import batch_sums, moments_from_sums, update_running_stats
from .rowwise import (COEFFICIENT_DTYPE, accumulation_dtype, row_grad_sums, row_grad_sums_about, row_moments,
                      row_normalize, row_normalize_backward)

NORMALIZERS = ('in', 'ln', 'bn')


class SNSpec(NamedTuple):
    """The host-side configuration of one SN call.

    ``normalizers``: the used subset of (IN, LN, BN), in that order; the last axis of the mixture
    tensors follows it. ``logits``: the mixture tensors are logits to softmax (else ratios with their
    own gradients). ``use_batch_stats``: BN moments from this batch (all-reduced over ``group``);
    otherwise from the running statistics, or none (zeros) when those are ``None``.
    ``update_stats``: move the running statistics towards the batch moments and count the batch in
    ``num_batches_tracked`` (``momentum=None``: cumulative average), on the device and only when the
    batch (over all ranks) holds elements.
    """
    normalizers: Tuple[str, ...]
    logits: bool
    use_batch_stats: bool
    update_stats: bool
    momentum: Optional[float]
    eps: float
    unbiased: bool
    group: object = None


class SwitchableNormFunction(torch.autograd.Function):
    """``y = SN(x)`` for ``x`` of shape (N, C, L); see the module docstring for the math.

    ``mean_mix`` and ``var_mix`` have shape (K,) or (G, K), K = ``len(spec.normalizers)``;
    ``var_mix=None`` ties the variance ratios to the mean ratios (SN_tied). Only the statistics of
    ``spec.normalizers`` are computed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean_mix: Tensor,
                var_mix: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], spec: SNSpec) -> Tensor:
        ctx.meta = (spec, mean_mix.shape, None if var_mix is None else var_mix.shape)
        with torch.autocast(x.device.type, enabled=False):
            if use_triton(x):
                return _triton_forward(ctx, x, weight, bias, mean_mix, var_mix, running_mean, running_var,
                                       num_batches_tracked, spec)
        acc, coef = accumulation_dtype(x.dtype), COEFFICIENT_DTYPE
        with torch.autocast(x.device.type, enabled=False):
            _, c, spatial = x.shape
            mu_in, var_in = row_moments(x)
            k = spatial / (spatial - 1) if spec.unbiased and spatial > 1 else 1.0
            var_in = var_in.to(coef) * k
            stats = {'in': (mu_in, var_in)}
            if 'ln' in spec.normalizers:
                mu_ln = mu_in.mean(1, keepdim=True)
                stats['ln'] = mu_ln, (var_in + (mu_in - mu_ln).square()).mean(1, keepdim=True)

            count = None
            if spec.use_batch_stats:
                sums = all_reduce_sum_(batch_sums(mu_in, var_in, spatial), spec.group)
                stats['bn'] = moments_from_sums(sums, coef)
                count = sums[-1]
                if spec.update_stats:
                    # A batch without elements (over all ranks) changes nothing, as in BatchNorm.
                    update_running_stats(running_mean, running_var, num_batches_tracked, *stats['bn'],
                                         spec.momentum, valid=count > 0)
            elif running_mean is not None:
                stats['bn'] = running_mean.to(coef), running_var.to(coef)
            elif 'bn' in spec.normalizers:
                stats['bn'] = mu_in.new_zeros(c), mu_in.new_zeros(c)

            rm = used_ratios(mean_mix, spec, coef)
            rv = rm if var_mix is None else used_ratios(var_mix, spec, coef)
            rm_c, rv_c = per_channel(rm, c), per_channel(rv, c)
            # (N, C) even when only LN statistics enter, which are (N, 1).
            mean = sum(rm_c[:, i] * stats[name][0] for i, name in enumerate(spec.normalizers)).expand_as(mu_in)
            var = sum(rv_c[:, i] * stats[name][1] for i, name in enumerate(spec.normalizers))
            rstd = (var + spec.eps).rsqrt().expand_as(mu_in)
            scale = rstd if weight is None else rstd * weight.to(coef)
            # The pass is centred on M rounded to x's accumulation dtype; the shift makes up for it.
            centre = mean.to(acc)
            shift = (centre - mean) * scale
            if bias is not None:
                shift = shift + bias.to(coef)
            y = row_normalize(x, centre, scale.to(acc), shift.to(acc))

        ln, bn = stats.get('ln', (None, None)), stats.get('bn', (None, None))
        ctx.save_for_backward(x, weight, rm, rv, mu_in, var_in, *ln, *bn, mean, centre, rstd, count)
        ctx.k = k
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            if use_triton(grad):
                return _triton_backward(ctx, grad)
        (x, weight, rm, rv, mu_in, var_in, mu_ln, var_ln, mu_bn, var_bn, mean, centre, rstd,
         count) = ctx.saved_tensors
        spec, mean_shape, var_shape = ctx.meta
        k = ctx.k
        stats = {'in': (mu_in, var_in), 'ln': (mu_ln, var_ln), 'bn': (mu_bn, var_bn)}
        c = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            sum_g, sum_gc = row_grad_sums_about(grad, x, centre, mean)
            a = rstd if weight is None else rstd * weight.to(rstd.dtype)
            d_mean = -a * sum_g
            d_var = -0.5 * a * rstd.square() * sum_gc

            groups = rm.shape[0]
            d_rm = torch.stack([_group_sums((d_mean * stats[name][0]).sum(0), groups, c)
                                for name in spec.normalizers], -1)
            d_rv = torch.stack([_group_sums((d_var * stats[name][1]).sum(0), groups, c)
                                for name in spec.normalizers], -1)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = _input_grad(grad, x, spec, per_channel(rm, c), per_channel(rv, c), stats, mean, centre, a,
                                 d_mean, d_var, count, k)
            d_weight = d_bias = None
            if weight is not None:  # affine: weight and bias come together
                d_weight = (sum_gc * rstd).sum(0).to(weight.dtype)
                d_bias = sum_g.sum(0).to(weight.dtype)
            if var_shape is None:
                d_mean_mix, d_var_mix = mix_grad(rm, d_rm + d_rv, spec, mean_shape), None
            else:
                d_mean_mix, d_var_mix = mix_grad(rm, d_rm, spec, mean_shape), mix_grad(rv, d_rv, spec, var_shape)
        return dx, d_weight, d_bias, d_mean_mix, d_var_mix, None, None, None, None


def _triton_forward(ctx, x, weight, bias, mean_mix, var_mix, running_mean, running_var, num_batches_tracked,
                    spec: SNSpec) -> Tensor:
    """The forward on the kernels: the moments pass, the batch sums (and their all-reduce), one
    coefficient kernel that also moves the running statistics, the output pass."""
    from . import triton_norms
    spatial = x.shape[2]
    mu_in, var_in = row_moments(x)
    bn_mode = 1 if spec.use_batch_stats else (2 if running_mean is not None else 0)
    sums = None
    if bn_mode == 1:
        sums = all_reduce_sum_(triton_norms.batch_sums(mu_in, var_in, None, None, spatial, spec.unbiased), spec.group)
    # The kernels read (G, K) rows; a contiguous tensor goes as it is (no alias for autograd to track).
    mean_mix = mean_mix if mean_mix.is_contiguous() else mean_mix.contiguous()
    var_mix = mean_mix if var_mix is None else var_mix if var_mix.is_contiguous() else var_mix.contiguous()
    centre, mean, rstd, scale, shift, ln, bn = triton_norms.sn_forward(
        mu_in, var_in, mean_mix, var_mix, weight, bias, sums, running_mean, running_var, num_batches_tracked,
        ','.join(spec.normalizers), spec.logits, bn_mode, spec.update_stats, spec.momentum, spec.eps, spec.unbiased,
        spatial)
    ctx.save_for_backward(x, weight, mean_mix, var_mix, mu_in, var_in, ln, bn, running_mean, running_var, centre,
                          mean, rstd, sums)
    ctx.bn_mode = bn_mode
    return row_normalize(x, centre, scale, shift)


def _triton_backward(ctx, grad: Tensor):
    """The backward on the kernels: the gradient-sums pass, the per-channel kernel (parameter and BN
    gradients, ratio shares), the BN gradients' all-reduce, the per-sample kernel (dx's coefficients),
    the ratio-gradient kernel and the input-gradient pass."""
    from . import triton_norms
    (x, weight, mean_mix, var_mix, mu_in, var_in, ln, bn, running_mean, running_var, centre, mean, rstd,
     sums) = ctx.saved_tensors
    spec, _, var_shape = ctx.meta
    normalizers, spatial, bn_mode = ','.join(spec.normalizers), x.shape[2], ctx.bn_mode
    sum_g, sum_gc = row_grad_sums(grad, x, centre)
    d_weight, d_bias, dbn, part = triton_norms.sn_channel_grads(
        sum_g, sum_gc, mu_in, var_in, ln, bn, running_mean, running_var, centre, mean, rstd, weight, mean_mix,
        var_mix, normalizers, spec.logits, bn_mode, spec.unbiased, spatial)
    dx = None
    if ctx.needs_input_grad[0]:
        if bn_mode == 1:
            all_reduce_sum_(dbn, spec.group)
        a, p, q = triton_norms.sn_sample_grads(sum_g, sum_gc, mu_in, ln, bn, dbn, sums, centre, mean, rstd, weight,
                                               mean_mix, var_mix, normalizers, spec.logits, bn_mode == 1,
                                               spec.unbiased, spatial)
        dx = row_normalize_backward(grad, x, centre, a, p, q)
    d_mean_mix = d_var_mix = None
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        d_mean_mix, d_var_mix = triton_norms.sn_ratio_grads(part, mean_mix, var_mix, normalizers, spec.logits,
                                                            var_shape is None)
        if var_shape is None:
            d_var_mix = None
    if weight is None:
        d_weight = d_bias = None
    return dx, d_weight, d_bias, d_mean_mix, d_var_mix, None, None, None, None


def used_ratios(mix: Tensor, spec: SNSpec, dtype: torch.dtype) -> Tensor:
    """(G, K) ratios over ``spec.normalizers`` from (K,) or (G, K) logits or ratios."""
    used = mix.to(dtype).reshape(-1, len(spec.normalizers))
    return used.softmax(-1) if spec.logits else used


def per_channel(ratios: Tensor, channels: int) -> Tensor:
    """(G, K) group ratios as rows that broadcast against (N, C): (C, K), or (1, K) for G = 1."""
    groups = ratios.shape[0]
    return ratios if groups == 1 else ratios.repeat_interleave(channels // groups, 0)


def mix_grad(ratios: Tensor, d_ratios: Tensor, spec: SNSpec, shape: torch.Size) -> Tensor:
    """The gradient of the (K,) or (G, K) mixture tensor from that of its (G, K) ratios."""
    if spec.logits:  # softmax backward
        d_ratios = ratios * (d_ratios - (ratios * d_ratios).sum(-1, keepdim=True))
    return d_ratios.reshape(shape)


def _group_sums(values: Tensor, groups: int, channels: int) -> Tensor:
    """(G,) sums over each group's channels of per-channel ``values`` ((C,) or a broadcast (1,))."""
    return values.expand(channels).reshape(groups, -1).sum(1)


def _input_grad(grad, x, spec, rm, rv, stats, mean, centre, a, d_mean, d_var, count, k):
    """``dx = g a + (x - M) P + Q`` with the (N, C) coefficients of the module docstring, in float64;
    the pass computes it as ``g a + (x - centre) P + Q + (centre - M) P``. ``rm``, ``rv`` are
    per-channel ratio rows over ``spec.normalizers``; ``count`` (elements per channel over all
    ranks) is ``None`` when the BN moments were constants."""
    _, c, spatial = x.shape
    mu_in = stats['in'][0]
    column = {name: i for i, name in enumerate(spec.normalizers)}
    p = torch.zeros_like(d_var)
    q = torch.zeros_like(d_mean)
    if 'in' in column:
        p = p + (2 * k / spatial) * rv[:, column['in']] * d_var
        q = q + rm[:, column['in']] * d_mean / spatial
    if 'ln' in column:
        inv_cl = 1.0 / (c * spatial)
        d_var_ln = (rv[:, column['ln']] * d_var).sum(1, keepdim=True)
        p = p + 2 * k * inv_cl * d_var_ln
        q = q + inv_cl * ((rm[:, column['ln']] * d_mean).sum(1, keepdim=True)
                          + 2 * d_var_ln * (mu_in - stats['ln'][0]))
    if count is not None and 'bn' in column:
        # The batch moments depend on every rank's x: their gradients are summed over ranks.
        d_bn = torch.cat([(rm[:, column['bn']] * d_mean).sum(0), (rv[:, column['bn']] * d_var).sum(0)]).double()
        all_reduce_sum_(d_bn, spec.group)
        d_mu_bn, d_var_bn = (d_bn / count.clamp(min=1)).to(a.dtype).chunk(2)
        p = p + 2 * k * d_var_bn
        q = q + d_mu_bn + 2 * d_var_bn * (mu_in - stats['bn'][0])
    q = q + p * (centre - mu_in)
    acc = centre.dtype
    return row_normalize_backward(grad, x, centre, a.to(acc), p.to(acc), q.to(acc))
