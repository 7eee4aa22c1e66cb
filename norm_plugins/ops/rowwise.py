"""The four row-wise passes every norm of this package reduces to, for ``x`` of shape (N, C, L).

A "row" is ``x[n, c, :]``. SN, SyncSN and BCN (both modes) differ only in the (N, C) coefficient math
between these passes, which stays in torch::

    1. row_moments(x)                    -> mean[n, c], var[n, c]        (biased, over L)
    2. row_normalize(x, M, A, B)         -> y  = (x - M) * A + B
    3. row_grad_sums(g, x, M)            -> sum_l g,  sum_l g * (x - M)
    4. row_normalize_backward(g, x, M, a, P, Q)
                                         -> dx = g * a + (x - M) * P + Q

``M`` is a per-row centre (for example the mixed mean); the centred forms keep full precision when
|mean| / std is large, where ``x * A + B`` cancels. (N, C) arguments and results are in the
accumulation dtype (float32, float64 for float64 inputs); tensor results have x's dtype and memory
layout. ``x`` and ``g`` may have any (N, C, L) strides, independently; NCL-contiguous and
channels-last ones (stride 1 along C) take the torch path's fastest CPU kernels.

Each function dispatches on :func:`norm_plugins.ops.backend.use_triton`: the Triton kernels for CUDA
tensors (or any tensor with ``NORM_PLUGINS_BACKEND=triton``), the torch implementation otherwise.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_fused
from .backend import use_triton

# Row means are float64 on every path: SN's and BCN's coefficient math takes differences of means
# (mu_in - mu_ln, m - mean_c), which a float32 mean of values near 1e4 would already have rounded
# by 5e-4 of a unit standard deviation.
MEAN_DTYPE = torch.float64
# SN's and BCN's (N, C) coefficient math runs in float64 too: it costs nothing next to the passes
# over x, and keeps those differences exact where |mean| / std is large.
COEFFICIENT_DTYPE = torch.float64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(x: Tensor) -> Tensor:
    """x (N, C, *spatial) as (N, C, L), a view whenever the spatial dimensions merge (NCHW- or
    channels-last-contiguous inputs, and slices of them such as a channel split): the kernels take
    any strides, and the torch path's plain formulas too, so nothing is copied or saved twice."""
    return x.flatten(2)


def shaped_like(rows: Tensor, x: Tensor) -> Tensor:
    """``rows`` (N, C, L) in x's shape, as a tensor of its own rather than a view: autograd forbids
    in-place ops (an inplace ReLU, ``out += identity``) on views made inside a custom Function or a
    checkpointed block."""
    if rows.shape == x.shape:
        return rows
    return torch.ops.aten._unsafe_view(rows, x.shape)


def _kernels():
    """The Triton kernels, imported on first use: triton is optional."""
    from . import triton_rowwise
    return triton_rowwise


def row_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean (float64, see :data:`MEAN_DTYPE`) and biased variance (accumulation dtype) of every row."""
    if use_triton(x):
        return _kernels().row_moments(x)
    acc = accumulation_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros(x.shape[:2], dtype=MEAN_DTYPE), x.new_zeros(x.shape[:2], dtype=acc)
    if cpu_fused.applies(x):
        fused = cpu_fused.run('moments', x)
        if fused is not None:
            return fused
    # The mean from float64 sums (one pass that upcasts as it reads, no copy of x).
    mean = x.sum(2, dtype=MEAN_DTYPE).div_(x.shape[2])
    half = x.dtype in (torch.float16, torch.bfloat16)
    blocks = _channel_blocks(x)
    if not (x.is_contiguous() or half) or blocks is None:
        # float64-accumulated Welford, without a copy for float32/float64.
        return mean, torch.var(x.to(acc), dim=2, correction=0)
    # BatchNorm's statistics kernel, rows taken as channels: a mean pass, then a centred pass, with a
    # float64 accumulator; it reads x in its own dtype (half precision: no float32 copy) and writes
    # nothing full-size. The running buffers it insists on updating are scratch.
    variances = []
    for block in blocks:
        scratch = x.new_zeros(block.shape[1], dtype=acc)
        variances.append(torch.batch_norm_update_stats(block, scratch, scratch.clone(), 0.0)[1])
    return mean, torch.cat(variances).view(x.shape[:2])


def row_normalize(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - centre) * scale + shift`` per row, in x's dtype and layout."""
    if use_triton(x):
        return _kernels().row_normalize(x, centre, scale, shift)
    if cpu_fused.applies(x, centre, scale, shift):
        fused = cpu_fused.run('normalize', x, centre, scale, shift)
        if fused is not None:
            return _in_layout_of(x, fused)
    blocks = _channel_blocks(x)
    if blocks is None:
        return _cast(_reference_affine(x, centre, scale, shift), x.dtype)
    y = torch.empty_like(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        for out, block, *coefficients in zip(_channel_blocks(y), blocks,
                                             *(_row_blocks(x, t) for t in (centre, scale, shift))):
            _half_affine(block, *coefficients, out=out)
        return y
    torch.sub(x, centre.unsqueeze(-1), out=y)
    return torch.addcmul(shift.unsqueeze(-1), y, scale.unsqueeze(-1), out=y)


def row_grad_sums(grad: Tensor, x: Tensor, centre: Tensor) -> Tuple[Tensor, Tensor]:
    """``sum_l g`` and ``sum_l g * (x - centre)`` per row, in the accumulation dtype."""
    if use_triton(x):
        return _kernels().row_grad_sums(grad, x, centre)
    if cpu_fused.applies(x, grad, centre):
        fused = cpu_fused.run('grad_sums', grad, x, centre)
        if fused is not None:
            return fused
    blocks = _channel_blocks(x)
    if blocks is None or grad.stride() != x.stride():
        gs = grad.to(centre.dtype)
        return gs.sum(2), (gs * (x.to(centre.dtype) - centre.unsqueeze(-1))).sum(2)
    # BatchNorm's backward kernel, rows taken as channels, with mean = centre and invstd = 1: its
    # grad_weight and grad_bias are these sums, from one read of g and x and without writing dx.
    sums = []
    for block, grad_block, centre_block in zip(blocks, _channel_blocks(grad), _row_blocks(x, centre)):
        _, sum_gc, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_block, block, None, None, None, centre_block, torch.ones_like(centre_block), True, 0.0,
            [False, True, True])
        sums.append((sum_g, sum_gc))
    sum_g, sum_gc = (torch.cat(t).view(centre.shape) for t in zip(*sums))
    return sum_g, sum_gc


def row_grad_sums_about(grad: Tensor, x: Tensor, centre: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    """``sum_l g`` and ``sum_l g * (x - mean)`` per row in :data:`COEFFICIENT_DTYPE`, from the pass
    centred on ``centre`` (``mean`` rounded to x's accumulation dtype):
    ``sum g (x - mean) = sum g (x - centre) + (centre - mean) sum g``."""
    sum_g, sum_gc = (t.to(COEFFICIENT_DTYPE) for t in row_grad_sums(grad, x, centre))
    return sum_g, sum_gc + (centre - mean) * sum_g


def row_normalize_backward(grad: Tensor, x: Tensor, centre: Tensor, a: Tensor, p: Tensor,
                           q: Tensor) -> Tensor:
    """``g * a + (x - centre) * p + q`` per row, in x's dtype and layout."""
    if use_triton(x):
        return _kernels().row_normalize_backward(grad, x, centre, a, p, q)
    # dx takes x's layout; the fused loop would give it g's where they differ.
    if grad.stride() == x.stride() and cpu_fused.applies(x, grad, centre, a, p, q):
        fused = cpu_fused.run('backward', grad, x, centre, a, p, q)
        if fused is not None:
            return _in_layout_of(x, fused)
    blocks = _channel_blocks(x)
    if blocks is None or grad.stride() != x.stride():
        dx = _reference_affine(x, centre, p, q).addcmul_(grad.to(a.dtype), a.unsqueeze(-1))
        return _in_layout_of(x, _cast(dx, x.dtype))
    dx = torch.empty_like(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        for out, block, grad_block, centre_block, a_block, p_block, q_block in zip(
                _channel_blocks(dx), blocks, _channel_blocks(grad),
                *(_row_blocks(x, t) for t in (centre, a, p, q))):
            _half_affine(block, centre_block, p_block, q_block, out=out)
            # g * a by eval-mode BatchNorm backward (unit variance): float32 arithmetic, one rounding.
            out.add_(torch.ops.aten.native_batch_norm_backward(
                grad_block, block, a_block, centre_block, torch.ones_like(a_block), None, None, False, 0.0,
                [True, False, False])[0])
        return dx
    torch.sub(x, centre.unsqueeze(-1), out=dx)
    torch.addcmul(q.unsqueeze(-1), dx, p.unsqueeze(-1), out=dx)
    return dx.addcmul_(grad, a.unsqueeze(-1))


def _in_layout_of(x: Tensor, result: Tensor) -> Tensor:
    """``result`` with x's strides: the fused loops keep a layout, but may lay out a tensor with a
    dimension of size 1 (a 1x1 map) differently."""
    return result if result.stride() == x.stride() else torch.empty_like(x).copy_(result)


def _reference_affine(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - centre) * scale + shift`` in the accumulation dtype, for layouts the kernels do not take."""
    # Out of place, as the result may be a forward's output (see _cast).
    return torch.addcmul(shift.unsqueeze(-1), x.to(centre.dtype) - centre.unsqueeze(-1), scale.unsqueeze(-1))


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the no-op alias when t has that dtype: torch 2.11's torch.compile
    takes the gradient of an autograd.Function output that aliases one of the forward's
    intermediates (a no-op cast, an in-place op's result) for zeros."""
    return t if t.dtype == dtype else t.to(dtype)


def _half_affine(block: Tensor, centre: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """``out = (block - centre) * scale + shift`` for a float16/bfloat16 block, by eval-mode BatchNorm
    with unit variance: one pass in float32 arithmetic, rounded once (mixed dtypes are several times
    slower in elementwise torch ops). The kernel computes ``x * scale + (shift - centre * scale)``;
    its float32 error, |x| / std * 2^-24, stays far below the output's own half-precision rounding
    at every offset a half-precision activation resolves."""
    torch.ops.aten.native_batch_norm.out(block, scale, shift, centre, torch.ones_like(centre), False, 0.0, 0.0,
                                         out=out, save_mean=centre.new_empty(0),
                                         save_invstd=centre.new_empty(0))


def _channel_blocks(x: Tensor) -> Optional[List[Tensor]]:
    """Views of (N, C, L) ``x`` whose channels are x's rows, as BatchNorm's CPU kernels take them
    without a copy: one (1, N*C, L) view of an NCL-contiguous x, or per sample a (1, C, L, 1)
    channels-last view of a channels-last x. ``None`` for any other layout, for empty x, off the
    CPU (the kernels' contract above is checked there only), and while torch.compile or
    torch.export traces: they get the plain formulas, which inductor fuses and ONNX expresses
    (BatchNorm's statistics and backward ops have no decomposition there)."""
    n, c, length = x.shape
    if x.numel() == 0 or x.device.type != 'cpu' or torch.compiler.is_compiling():
        return None
    if x.is_contiguous():
        return [x.view(1, n * c, length)]
    if x.stride(1) == 1 and x.stride(2) == c and x.stride(0) == c * length:
        return [sample.unsqueeze(0).unsqueeze(-1) for sample in x]
    return None


def _row_blocks(x: Tensor, t: Tensor) -> List[Tensor]:
    """An (N, C) coefficient split like :func:`_channel_blocks` splits ``x``."""
    return [t.reshape(-1)] if x.is_contiguous() else list(t)
