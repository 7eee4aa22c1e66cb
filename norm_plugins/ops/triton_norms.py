"""Launches of the coefficient kernels (:mod:`norm_plugins.ops.triton_coefficients`), one function per
kernel: SN's and BCN's (N, C) math between the row-wise passes on the Triton path.

The functions allocate their outputs (no launch) and make exactly one launch each; the autograd
functions in :mod:`~norm_plugins.ops.switchable_norm_fn` and
:mod:`~norm_plugins.ops.batch_channel_norm_fn` call them between the passes and the all-reduces,
and keep the torch formulas beside them as the reference. Like the passes, each is a torch custom op
under ``torch.compile`` (opaque, shapes from a fake implementation; the buffers they update are
declared mutated) and a direct launch in eager mode.
"""
import functools
import struct
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from . import triton_coefficients as kernels
from .triton_rowwise import launch

NORMALIZERS = ('in', 'ln', 'bn')
# Per-sample programs walk C in tiles of up to this many channels; per-channel programs take
# CHANNEL_TILE channels each and walk N.
SAMPLE_TILE = 1024
CHANNEL_TILE = 128
GROUP_TILE_ELEMENTS = 1024


def _columns(normalizers: str) -> dict:
    """The mixture tensors' layout from the used normalizers, comma-separated (e.g. ``'in,bn'``):
    K columns, the column of each normalizer or -1."""
    used = normalizers.split(',')
    return dict(K=len(used), **{f'COL_{name.upper()}': (used.index(name) if name in used else -1)
                                for name in NORMALIZERS})


def _float32_parts(value: Optional[float]) -> Tuple[float, float]:
    """``value`` as high and low float32 parts (a kernel's float arguments are float32)."""
    value = value or 0.0
    high = struct.unpack('f', struct.pack('f', value))[0]
    return high, value - high


def _count(normalizers: str) -> int:
    return normalizers.count(',') + 1


def _tile(size: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(size, 1)), cap)


def _op(name: str, mutates_args=(), fake=None):
    """Register ``impl`` as ``torch.ops.norm_plugins.<name>`` and return a function that calls the op
    while torch.compile traces and ``impl`` itself otherwise (a custom op call costs host time)."""
    def register(impl):
        op = torch.library.custom_op(f'norm_plugins::{name}', impl, mutates_args=mutates_args)
        op.register_fake(fake)

        @functools.wraps(impl)
        def call(*args):
            return (op if torch.compiler.is_compiling() else impl)(*args)
        return call
    return register


def _fake_sums(m, v, centre, spread, spatial, unbiased):
    return m.new_empty(2 * m.shape[1] + 1 + (2 * m.shape[1] if centre is not None else 0), dtype=torch.float64)


@_op('batch_sums', fake=_fake_sums)
def batch_sums(m: Tensor, v: Tensor, centre: Optional[Tensor], spread: Optional[Tensor], spatial: int,
               unbiased: bool) -> Tensor:
    """Per-channel ``[sum x, sum (x - centre)^2, count]`` (float64) from (N, C) moments; with a centre
    (and ``spread``), the two follow the sums (see ``batch_sums_kernel``)."""
    n, c = m.shape
    sums = m.new_empty(2 * c + 1 + (2 * c if centre is not None else 0), dtype=torch.float64)
    block = _tile(c, CHANNEL_TILE)
    launch(kernels.batch_sums_kernel, (triton.cdiv(c, block),), m.device, m, v,
           m if centre is None else centre, m if spread is None else spread, sums, n, c, spatial,
           HAS_CENTRE=centre is not None, UNBIASED=unbiased, BLOCK_C=block)
    return sums


def _sn_forward_outputs(mu: Tensor, var: Tensor):
    """(centre, M, rstd, A, B, ln, bn): the passes' coefficients in var's dtype, the rest float64."""
    n, c = mu.shape
    f64 = torch.float64
    return (torch.empty_like(var), mu.new_empty((n, c), dtype=f64), mu.new_empty((n, c), dtype=f64),
            torch.empty_like(var), torch.empty_like(var), mu.new_empty((n, 2), dtype=f64),
            mu.new_empty((2, c), dtype=f64))


def _fake_sn_forward(mu, var, mean_mix, var_mix, weight, bias, sums, running_mean, running_var, nbt,
                     normalizers, logits, bn_mode, update, momentum, eps, unbiased, spatial):
    return _sn_forward_outputs(mu, var)


@_op('sn_forward', mutates_args=('running_mean', 'running_var', 'nbt'), fake=_fake_sn_forward)
def sn_forward(mu: Tensor, var: Tensor, mean_mix: Tensor, var_mix: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], sums: Optional[Tensor], running_mean: Optional[Tensor],
               running_var: Optional[Tensor], nbt: Optional[Tensor], normalizers: str, logits: bool,
               bn_mode: int, update: bool, momentum: Optional[float], eps: float, unbiased: bool,
               spatial: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SN's forward coefficients: ``(centre, M, rstd, A, B, ln, bn)`` (``ln`` (N, 2): per-sample LN
    moments; ``bn`` (2, C): the batch's BN moments when ``bn_mode`` is 1), moving the running
    statistics when ``update``. ``var_mix`` is ``mean_mix`` for tied ratios."""
    n, c = mu.shape
    centre, mean, rstd, scale, shift, ln, bn = outputs = _sn_forward_outputs(mu, var)
    groups = mean_mix.numel() // _count(normalizers)
    launch(kernels.sn_forward_kernel, (max(n, 1),), mu.device, mu, var, mean_mix, var_mix,
           _or(weight, mu), _or(bias, mu), _or(sums, mu), _or(running_mean, mu), _or(running_var, mu),
           _or(nbt, mu), centre, mean, rstd, scale, shift, ln, bn, n, c, spatial, c // groups, eps,
           *_float32_parts(momentum), **_columns(normalizers), LOGITS=logits, BN_MODE=bn_mode,
           UPDATE=update, CUMULATIVE=momentum is None, AFFINE=weight is not None, UNBIASED=unbiased,
           BLOCK_C=_tile(c, SAMPLE_TILE))
    return outputs


def _or(tensor: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """A pointer argument the kernel does not read (its flag is off) still needs a tensor."""
    return placeholder if tensor is None else tensor


def _fake_sn_channel_grads(sum_g, sum_gc, mu, var, ln, bn, running_mean, running_var, centre, mean, rstd, weight,
                           mean_mix, var_mix, normalizers, logits, bn_mode, unbiased, spatial):
    c = mu.shape[1]
    like = weight if weight is not None else mu.new_empty(0)
    return (like.new_empty(c), like.new_empty(c), mu.new_empty(2 * c, dtype=torch.float64),
            mu.new_empty((c, 6), dtype=torch.float64))


@_op('sn_channel_grads', fake=_fake_sn_channel_grads)
def sn_channel_grads(sum_g: Tensor, sum_gc: Tensor, mu: Tensor, var: Tensor, ln: Tensor, bn: Tensor,
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], centre: Tensor, mean: Tensor,
                     rstd: Tensor, weight: Optional[Tensor], mean_mix: Tensor, var_mix: Tensor, normalizers: str,
                     logits: bool, bn_mode: int, unbiased: bool, spatial: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per channel: ``(d weight, d bias, dbn, part)``; ``dbn`` (2C, float64) are the BN moments'
    gradients to all-reduce, ``part`` (C, 6) the ratios' gradient shares."""
    n, c = mu.shape
    like = weight if weight is not None else mu.new_empty(0)
    d_weight, d_bias = like.new_empty(c), like.new_empty(c)
    dbn, part = mu.new_empty(2 * c, dtype=torch.float64), mu.new_empty((c, 6), dtype=torch.float64)
    block = _tile(c, CHANNEL_TILE)
    launch(kernels.sn_channel_grad_kernel, (triton.cdiv(c, block),), mu.device, sum_g, sum_gc, mu, var, ln, bn,
           _or(running_mean, mu), _or(running_var, mu), centre, mean, rstd, _or(weight, mu), mean_mix, var_mix,
           d_weight, d_bias,
           dbn, part, n, c, spatial, c * _count(normalizers) // mean_mix.numel(), **_columns(normalizers),
           LOGITS=logits, BN_MODE=bn_mode, AFFINE=weight is not None, UNBIASED=unbiased, BLOCK_C=block)
    return d_weight, d_bias, dbn, part


def _fake_sn_sample_grads(sum_g, sum_gc, mu, ln, bn, dbn, sums, centre, mean, rstd, weight, mean_mix, var_mix,
                          normalizers, logits, batch, unbiased, spatial):
    return tuple(torch.empty_like(centre) for _ in range(3))


@_op('sn_sample_grads', fake=_fake_sn_sample_grads)
def sn_sample_grads(sum_g: Tensor, sum_gc: Tensor, mu: Tensor, ln: Tensor, bn: Tensor, dbn: Tensor,
                    sums: Optional[Tensor], centre: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                    mean_mix: Tensor, var_mix: Tensor, normalizers: str, logits: bool, batch: bool, unbiased: bool,
                    spatial: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The input gradient's ``(a, P, Q)`` for the pass centred on ``centre``, with the
    (all-reduced) ``dbn`` when ``batch``."""
    n, c = mu.shape
    a, p, q = (torch.empty_like(centre) for _ in range(3))
    if n:
        launch(kernels.sn_sample_grad_kernel, (n,), mu.device, sum_g, sum_gc, mu, ln, bn, dbn, _or(sums, mu), centre,
               mean, rstd, _or(weight, mu), mean_mix, var_mix, a, p, q, c, spatial,
               c * _count(normalizers) // mean_mix.numel(), **_columns(normalizers), LOGITS=logits, BATCH=batch,
               AFFINE=weight is not None, UNBIASED=unbiased, BLOCK_C=_tile(c, SAMPLE_TILE))
    return a, p, q


def _fake_sn_ratio_grads(part, mean_mix, var_mix, normalizers, logits, tied):
    return torch.empty_like(mean_mix), torch.empty_like(var_mix)


@_op('sn_ratio_grads', fake=_fake_sn_ratio_grads)
def sn_ratio_grads(part: Tensor, mean_mix: Tensor, var_mix: Tensor, normalizers: str, logits: bool,
                   tied: bool) -> Tuple[Tensor, Tensor]:
    """The gradients of the mixture tensors (tied: all in the first) from the ratio partials."""
    c = part.shape[0]
    groups = mean_mix.numel() // _count(normalizers)
    d_mean, d_var = torch.empty_like(mean_mix), torch.empty_like(var_mix)
    launch(kernels.sn_ratio_grad_kernel, (groups,), part.device, part, mean_mix, var_mix, d_mean, d_var,
           c // groups, **_columns(normalizers), LOGITS=logits, TIED=tied, BLOCK_C=_tile(c // groups, 256))
    return d_mean, d_var


def _group_tiles(c: int, groups: int) -> dict:
    block_k = triton.next_power_of_2(c // groups)
    return dict(BLOCK_G=_tile(groups, max(1, GROUP_TILE_ELEMENTS // block_k)), BLOCK_K=block_k)


def _bcn_forward_outputs(m: Tensor, v: Tensor):
    """(centre, A, B) in v's dtype and the per-channel statistics (2, C, float64)."""
    return (torch.empty_like(v), torch.empty_like(v), torch.empty_like(v),
            m.new_empty((2, m.shape[1]), dtype=torch.float64))


def _fake_bcn_forward(m, v, sums, mean, var, rate, weight, bias, group_weight, group_bias, running_mean,
                      running_var, nbt, groups, eps, momentum, stats_mode, update):
    return _bcn_forward_outputs(m, v)


@_op('bcn_forward', mutates_args=('mean', 'var', 'running_mean', 'running_var', 'nbt'), fake=_fake_bcn_forward)
def bcn_forward(m: Tensor, v: Tensor, sums: Optional[Tensor], mean: Optional[Tensor], var: Optional[Tensor],
                rate: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                group_weight: Optional[Tensor], group_bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], nbt: Optional[Tensor], groups: int, eps: float,
                momentum: Optional[float], stats_mode: int, update: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """BCN's forward coefficients ``(centre, A, B, stats)`` with the per-channel statistics ``stats``
    (2, C, float64) they used; ``stats_mode`` as ``_bcn_channel_stats`` (micro-batch training updates
    ``mean``/``var``, the estimates, at rate ``rate``), ``update``: move the running statistics."""
    n, c = m.shape
    centre, scale, shift, stats = outputs = _bcn_forward_outputs(m, v)
    launch(kernels.bcn_forward_kernel, (max(n, 1),), m.device, m, v, _or(sums, m), _or(mean, m), _or(var, m),
           _or(rate, m), _or(weight, m), _or(bias, m), _or(group_weight, m), _or(group_bias, m),
           _or(running_mean, m), _or(running_var, m), _or(nbt, m), stats, centre, scale, shift, n, c, groups, eps,
           *_float32_parts(momentum), MODE=stats_mode, UPDATE=update, CUMULATIVE=momentum is None,
           AFFINE=weight is not None, BLOCK_C=_tile(c, SAMPLE_TILE), **_group_tiles(c, groups))
    return outputs


def _fake_bcn_sample_grads(s1, s2, m, v, centre, stats, weight, bias, group_weight, groups, eps, spatial):
    n, c = m.shape
    return (m.new_empty((n, c), dtype=torch.float64), m.new_empty((n, c), dtype=torch.float64),
            m.new_empty((n, 2, groups), dtype=torch.float64), *(torch.empty_like(centre) for _ in range(3)))


@_op('bcn_sample_grads', fake=_fake_bcn_sample_grads)
def bcn_sample_grads(s1: Tensor, s2: Tensor, m: Tensor, v: Tensor, centre: Tensor, stats: Tensor,
                     weight: Optional[Tensor], bias: Optional[Tensor], group_weight: Optional[Tensor], groups: int,
                     eps: float, spatial: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per sample: ``(E1, E2, grp, a, P, Q)`` of BCN's backward for passes centred on ``centre``,
    P and Q without batch terms."""
    n, c = m.shape
    e1, e2 = m.new_empty((n, c), dtype=torch.float64), m.new_empty((n, c), dtype=torch.float64)
    grp = m.new_empty((n, 2, groups), dtype=torch.float64)
    a, p, q = (torch.empty_like(centre) for _ in range(3))
    if n:
        launch(kernels.bcn_sample_grad_kernel, (n,), m.device, s1, s2, m, v, centre, stats, _or(weight, m),
               _or(bias, m),
               _or(group_weight, m), e1, e2, grp, a, p, q, c, groups, spatial, eps, AFFINE=weight is not None,
               **_group_tiles(c, groups))
    return e1, e2, grp, a, p, q


def _fake_bcn_channel_grads(e1, e2, grp, m, centre, stats, weight, sums, p, q, groups, eps, batch, sync):
    c = m.shape[1]
    like = weight if weight is not None else m.new_empty(0)
    return (like.new_empty(c), like.new_empty(c), like.new_empty(groups), like.new_empty(groups),
            m.new_empty(2 * c, dtype=torch.float64))


@_op('bcn_channel_grads', mutates_args=('p', 'q'), fake=_fake_bcn_channel_grads)
def bcn_channel_grads(e1: Tensor, e2: Tensor, grp: Tensor, m: Tensor, centre: Tensor, stats: Tensor,
                      weight: Optional[Tensor], sums: Optional[Tensor], p: Tensor, q: Tensor, groups: int, eps: float,
                      batch: bool, sync: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(d weight, d bias, d group_weight, d group_bias, f)``; with batch statistics, P and Q get
    their batch terms in place, or (``sync``) ``f`` holds F1, F2 for the all-reduce."""
    n, c = m.shape
    like = weight if weight is not None else m.new_empty(0)
    d_weight, d_bias = like.new_empty(c), like.new_empty(c)
    d_group_weight, d_group_bias = like.new_empty(groups), like.new_empty(groups)
    f = m.new_empty(2 * c, dtype=torch.float64)
    block_c = _tile(c, CHANNEL_TILE)
    block_g = _tile(groups, CHANNEL_TILE)
    grid = max(triton.cdiv(c, block_c), triton.cdiv(groups, block_g))
    launch(kernels.bcn_channel_grad_kernel, (grid,), m.device, e1, e2, grp, m, centre, stats, _or(weight, m),
           _or(sums, m),
           d_weight, d_bias, d_group_weight, d_group_bias, f, p, q, n, c, groups, eps, AFFINE=weight is not None,
           BATCH=batch, SYNC=sync, BLOCK_C=block_c, BLOCK_G=block_g)
    return d_weight, d_bias, d_group_weight, d_group_bias, f


def _fake_bcn_batch_terms(f, centre, stats, weight, sums, p, q, eps):
    return None


@_op('bcn_batch_terms', mutates_args=('p', 'q'), fake=_fake_bcn_batch_terms)
def bcn_batch_terms(f: Tensor, centre: Tensor, stats: Tensor, weight: Optional[Tensor], sums: Tensor, p: Tensor,
                    q: Tensor, eps: float) -> None:
    """Synchronized BCN: P and Q get the batch terms of the all-reduced F1, F2, in place."""
    n, c = centre.shape
    block = _tile(c, CHANNEL_TILE)
    launch(kernels.bcn_batch_terms_kernel, (triton.cdiv(c, block),), centre.device, f, centre, stats,
           _or(weight, centre), sums, p, q, n, c, eps, AFFINE=weight is not None, BLOCK_C=block)
