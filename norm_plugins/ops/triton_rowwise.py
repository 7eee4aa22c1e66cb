"""Triton kernels of the four row-wise passes of :mod:`norm_plugins.ops.rowwise` over x (N, C, L).

One kernel per pass, each launched by a thin wrapper (the torch reference is in ``rowwise.py``)::

    _moments_kernel             per-(n, c) mean and M2 (per-lane Welford, lanes merged exactly)
    _grad_sums_kernel           per-(n, c) sum_l g and sum_l g * (x - M)
    _normalize_kernel           y  = (x - M) * A + B
    _normalize_backward_kernel  dx = g * a + (x - M) * P + Q
    _combine_kernel             merges the per-chunk partials of a reduction whose rows were split

Every program handles a tile of ``BLOCK_C`` channels of one sample and walks ``chunk`` positions of
L in steps of ``BLOCK_L``. Strides are arguments, so NCL-contiguous and channels-last tensors (x, g
and the output independently) are read in place: the tile's fast axis follows x's unit stride, which
keeps loads coalesced for either layout. (N, C) coefficients may be broadcast views (stride 0).

Filling the GPU: with few long rows (2x64x400x672 is 128 rows of 268,800) one program per row
leaves most SMs idle, so :func:`make_plan` cuts every row into ``split`` chunks, enough for about
``PROGRAMS_PER_SM`` programs per SM. The reductions then write per-chunk partials (mean and M2, or
plain sums; the counts follow from the plan) and one tiny launch merges them by Chan's formula; with
one chunk per row the reduction kernel writes the result itself. Accumulation is float32 (float64
for float64 inputs); loads upcast and stores round to the output's dtype.

The public functions are torch custom ops (``torch.ops.norm_plugins.*``, opaque to
``torch.compile`` through their fake implementations). Eager calls skip the dispatcher and launch
directly: a custom op call costs about 15 us of host time, a noticeable share of a layer's budget on
a GPU.
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rowwise import accumulation_dtype

# A tile of 2048 elements: 16 per thread at 4 warps (8 KB of float32 per load).
TILE = 2048
NUM_WARPS = 4
# Channels per tile when C is the unit-stride axis: 64 float32 are 256 contiguous bytes.
MAX_BLOCK_C_CHANNELS_LAST = 64
PROGRAMS_PER_SM = 4
# Without a CUDA device (the interpreter), plan as for an H100 so the tests run the GPU's plans.
DEFAULT_SM_COUNT = 132
MAX_SPLIT = 512


class Plan(NamedTuple):
    """Launch geometry: tiles of ``block_c`` x ``block_l``, each row cut into ``split`` chunks of
    ``chunk`` positions (a multiple of ``block_l``)."""
    block_c: int
    block_l: int
    split: int
    chunk: int


def make_plan(shape: Tuple[int, int, int], strides: Tuple[int, int, int], sm_count: int,
              block_c: Optional[int] = None, block_l: Optional[int] = None,
              split: Optional[int] = None) -> Plan:
    """The launch plan for a tensor of ``shape`` and ``strides``; the keyword arguments force parts
    of it (tests use them to run the split-row logic on small shapes)."""
    n, c, length = shape
    if block_c is None or block_l is None:
        if c > 1 and length > 1 and strides[1] < strides[2]:
            # C is the faster axis (channels-last): the tile spans channels first.
            block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C_CHANNELS_LAST)
            block_l = min(triton.next_power_of_2(length), TILE // block_c)
        else:
            block_l = min(triton.next_power_of_2(length), TILE)
            block_c = min(triton.next_power_of_2(c), TILE // block_l)
    tiles = triton.cdiv(length, block_l)
    if split is None:
        groups = n * triton.cdiv(c, block_c)
        split = max(1, triton.cdiv(sm_count * PROGRAMS_PER_SM, max(groups, 1)))
    split = max(1, min(split, tiles, MAX_SPLIT))
    chunk = triton.cdiv(tiles, split) * block_l
    return Plan(block_c, block_l, triton.cdiv(length, chunk), chunk)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def plan_for(x: Tensor) -> Plan:
    return make_plan(tuple(x.shape), x.stride(), _sm_count(x.device))


@triton.jit
def _tile_origin(C, BLOCK_C: tl.constexpr):
    """This program's sample (int64: offsets must not overflow), its channels and their mask."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = (tl.program_id(0) // c_blocks).to(tl.int64)
    cs = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, cs, cs < C


@triton.jit
def _chunk_bounds(L, chunk):
    start = tl.program_id(1) * chunk
    return start, tl.minimum(start + chunk, L)


@triton.jit
def _load_coefficient(ptr, n, cs, c_mask, stride_n, stride_c):
    """An (N, C) coefficient for the tile's channels, as a [BLOCK_C, 1] column in its own dtype."""
    return tl.load(ptr + n * stride_n + cs * stride_c, mask=c_mask, other=0.)[:, None]


@triton.jit
def _store_pair(first, second, out1_ptr, out2_ptr, part_ptr, R, rows, mask, FINAL: tl.constexpr):
    """Per-row results of a reduction: the final (N, C) outputs when rows are not split, else this
    chunk's slot in the (2, R, split) partials."""
    if FINAL:
        tl.store(out1_ptr + rows, first, mask=mask)
        tl.store(out2_ptr + rows, second, mask=mask)
    else:
        offsets = rows * tl.num_programs(1) + tl.program_id(1)
        tl.store(part_ptr + offsets, first, mask=mask)
        tl.store(part_ptr + R * tl.num_programs(1) + offsets, second, mask=mask)


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, var_ptr, part_ptr, R, C, L, chunk,
                    stride_xn, stride_xc, stride_xl,
                    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, FINAL: tl.constexpr):
    """Mean and M2 = sum (x - mean)^2 of one chunk of BLOCK_C rows (mean and M2 / L when FINAL).

    Every lane runs Welford over the positions it visits, on x minus the row's first value: with
    |mean| >> std the shifted values keep every digit a float32 running mean would round away. The
    lanes are then merged exactly, M2 = sum_lanes M2_lane + count_lane * (mean_lane - mean)^2.
    Partials keep the shift (every chunk of a row shares it); the final mean adds it back.
    """
    acc_ty = mean_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C)
    start, end = _chunk_bounds(L, chunk)
    x_base = x_ptr + n * stride_xn + cs[:, None] * stride_xc
    shift = tl.load(x_base, mask=c_mask[:, None], other=0.).to(acc_ty)
    lanes = tl.arange(0, BLOCK_L)
    mean = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    m2 = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + lanes
        mask = c_mask[:, None] & (ls < end)[None, :]
        v = tl.load(x_base + ls[None, :] * stride_xl, mask=mask, other=0.).to(acc_ty) - shift
        # Only a chunk's last tile is partial, so every active lane has now seen this many values.
        inv_seen = 1.0 / ((l0 - start) // BLOCK_L + 1).to(acc_ty)
        delta = tl.where(mask, v - mean, 0.)
        mean += delta * inv_seen
        m2 += delta * (v - mean)
    total = end - start
    counts = (total // BLOCK_L + (lanes < total % BLOCK_L).to(tl.int32)).to(acc_ty)
    chunk_mean = tl.sum(mean * counts[None, :], axis=1) / tl.cast(total, acc_ty)
    spread = mean - chunk_mean[:, None]
    chunk_m2 = tl.sum(m2 + counts[None, :] * spread * spread, axis=1)
    if FINAL:
        chunk_mean += tl.reshape(shift, [BLOCK_C])
        chunk_m2 = chunk_m2 / tl.cast(total, acc_ty)
    _store_pair(chunk_mean, chunk_m2, mean_ptr, var_ptr, part_ptr, R, n * C + cs, c_mask, FINAL)


@triton.jit
def _grad_sums_kernel(g_ptr, x_ptr, m_ptr, sum_g_ptr, sum_gx_ptr, part_ptr, R, C, L, chunk,
                      stride_gn, stride_gc, stride_gl, stride_xn, stride_xc, stride_xl,
                      stride_mn, stride_mc,
                      BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, FINAL: tl.constexpr):
    """sum g and sum g * (x - M) over one chunk of BLOCK_C rows."""
    acc_ty = sum_g_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C)
    start, end = _chunk_bounds(L, chunk)
    centre = _load_coefficient(m_ptr, n, cs, c_mask, stride_mn, stride_mc).to(acc_ty)
    g_base = g_ptr + n * stride_gn + cs[:, None] * stride_gc
    x_base = x_ptr + n * stride_xn + cs[:, None] * stride_xc
    sum_g = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    sum_gx = tl.zeros([BLOCK_C, BLOCK_L], acc_ty)
    for l0 in range(start, end, BLOCK_L):
        ls = (l0 + tl.arange(0, BLOCK_L))[None, :]
        mask = c_mask[:, None] & (ls < end)
        g = tl.load(g_base + ls * stride_gl, mask=mask, other=0.).to(acc_ty)
        v = tl.load(x_base + ls * stride_xl, mask=mask, other=0.).to(acc_ty)
        sum_g += g
        sum_gx += g * (v - centre)
    _store_pair(tl.sum(sum_g, axis=1), tl.sum(sum_gx, axis=1), sum_g_ptr, sum_gx_ptr, part_ptr, R,
                n * C + cs, c_mask, FINAL)


@triton.jit
def _combine_kernel(part_ptr, x_ptr, out1_ptr, out2_ptr, R, C, L, chunk, n_split,
                    stride_xn, stride_xc,
                    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, MOMENTS: tl.constexpr):
    """Merges the (2, R, n_split) per-chunk partials of BLOCK_R rows: plain sums, or (MOMENTS)
    chunk means (shifted by the row's first value x[n, c, 0]) and M2 by Chan's formula into mean
    and biased variance."""
    acc_ty = out1_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    slots = tl.arange(0, BLOCK_S)
    row_mask = rows < R
    mask = row_mask[:, None] & (slots < n_split)[None, :]
    offsets = rows[:, None] * n_split + slots[None, :]
    first = tl.load(part_ptr + offsets, mask=mask, other=0.)
    second = tl.load(part_ptr + R * n_split + offsets, mask=mask, other=0.)
    if MOMENTS:
        counts = tl.where(slots < n_split, tl.minimum(chunk, L - slots * chunk), 0).to(acc_ty)
        shifted_mean = tl.sum(first * counts[None, :], axis=1) / tl.cast(L, acc_ty)
        spread = first - shifted_mean[:, None]
        m2 = tl.sum(second + counts[None, :] * spread * spread, axis=1)
        row_starts = x_ptr + (rows // C).to(tl.int64) * stride_xn + (rows % C) * stride_xc
        mean = tl.load(row_starts, mask=row_mask, other=0.).to(acc_ty) + shifted_mean
        tl.store(out1_ptr + rows, mean, mask=row_mask)
        tl.store(out2_ptr + rows, m2 / tl.cast(L, acc_ty), mask=row_mask)
    else:
        tl.store(out1_ptr + rows, tl.sum(first, axis=1), mask=row_mask)
        tl.store(out2_ptr + rows, tl.sum(second, axis=1), mask=row_mask)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, m_ptr, a_ptr, b_ptr, C, L, chunk,
                      stride_xn, stride_xc, stride_xl, stride_yn, stride_yc, stride_yl,
                      stride_mn, stride_mc, stride_an, stride_ac, stride_bn, stride_bc,
                      BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """y = (x - M) * A + B over one chunk of BLOCK_C rows, computed in M's dtype."""
    acc_ty = m_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C)
    start, end = _chunk_bounds(L, chunk)
    centre = _load_coefficient(m_ptr, n, cs, c_mask, stride_mn, stride_mc)
    scale = _load_coefficient(a_ptr, n, cs, c_mask, stride_an, stride_ac).to(acc_ty)
    shift = _load_coefficient(b_ptr, n, cs, c_mask, stride_bn, stride_bc).to(acc_ty)
    x_base = x_ptr + n * stride_xn + cs[:, None] * stride_xc
    y_base = y_ptr + n * stride_yn + cs[:, None] * stride_yc
    for l0 in range(start, end, BLOCK_L):
        ls = (l0 + tl.arange(0, BLOCK_L))[None, :]
        mask = c_mask[:, None] & (ls < end)
        v = tl.load(x_base + ls * stride_xl, mask=mask, other=0.).to(acc_ty)
        y = (v - centre) * scale + shift
        tl.store(y_base + ls * stride_yl, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_backward_kernel(g_ptr, x_ptr, dx_ptr, m_ptr, a_ptr, p_ptr, q_ptr, C, L, chunk,
                               stride_gn, stride_gc, stride_gl, stride_xn, stride_xc, stride_xl,
                               stride_dn, stride_dc, stride_dl, stride_mn, stride_mc,
                               stride_an, stride_ac, stride_pn, stride_pc, stride_qn, stride_qc,
                               BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx = g * a + (x - M) * P + Q over one chunk of BLOCK_C rows, computed in M's dtype."""
    acc_ty = m_ptr.dtype.element_ty
    n, cs, c_mask = _tile_origin(C, BLOCK_C)
    start, end = _chunk_bounds(L, chunk)
    centre = _load_coefficient(m_ptr, n, cs, c_mask, stride_mn, stride_mc)
    a = _load_coefficient(a_ptr, n, cs, c_mask, stride_an, stride_ac).to(acc_ty)
    p = _load_coefficient(p_ptr, n, cs, c_mask, stride_pn, stride_pc).to(acc_ty)
    q = _load_coefficient(q_ptr, n, cs, c_mask, stride_qn, stride_qc).to(acc_ty)
    g_base = g_ptr + n * stride_gn + cs[:, None] * stride_gc
    x_base = x_ptr + n * stride_xn + cs[:, None] * stride_xc
    dx_base = dx_ptr + n * stride_dn + cs[:, None] * stride_dc
    for l0 in range(start, end, BLOCK_L):
        ls = (l0 + tl.arange(0, BLOCK_L))[None, :]
        mask = c_mask[:, None] & (ls < end)
        g = tl.load(g_base + ls * stride_gl, mask=mask, other=0.).to(acc_ty)
        v = tl.load(x_base + ls * stride_xl, mask=mask, other=0.).to(acc_ty)
        dx = g * a + (v - centre) * p + q
        tl.store(dx_base + ls * stride_dl, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _check_rows(x: Tensor, name: str = 'x') -> Tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f'{name} must have shape (N, C, L), got {tuple(x.shape)}; reshape it with '
                         f'{name}.reshape(n, c, -1) (which keeps channels-last strides).')
    return tuple(x.shape)


def _check_grad(grad: Tensor, x: Tensor) -> None:
    if grad.shape != x.shape:
        raise ValueError(f'grad {tuple(grad.shape)} and x {tuple(x.shape)} must have one shape')


def _grid(n: int, c: int, plan: Plan) -> Tuple[int, int]:
    return n * triton.cdiv(c, plan.block_c), plan.split


def _reduce(kernel, inputs, strides, x: Tensor, out_dtype: torch.dtype, plan: Plan,
            moments: bool) -> Tuple[Tensor, Tensor]:
    """Launches a reduction kernel and, for split rows, the combine kernel: two (N, C) results."""
    n, c, length = x.shape
    out1 = x.new_empty((n, c), dtype=out_dtype)
    out2 = x.new_empty((n, c), dtype=out_dtype)
    final = plan.split == 1
    part = out1 if final else x.new_empty((2, n * c, plan.split), dtype=out_dtype)
    kernel[_grid(n, c, plan)](*inputs, out1, out2, part, n * c, c, length, plan.chunk, *strides,
                              BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, FINAL=final,
                              num_warps=NUM_WARPS)
    if not final:
        block_s = triton.next_power_of_2(plan.split)
        block_r = min(triton.next_power_of_2(n * c), max(1, TILE // block_s))
        _combine_kernel[(triton.cdiv(n * c, block_r),)](
            part, x, out1, out2, n * c, c, length, plan.chunk, plan.split, x.stride(0), x.stride(1),
            BLOCK_R=block_r, BLOCK_S=block_s, MOMENTS=moments, num_warps=NUM_WARPS)
    return out1, out2


def _coefficients(n: int, c: int, *coefficients: Tensor):
    """(N, C) views of per-row coefficients given as (N, C), (1, C), (C,) or scalars: broadcasting
    costs a zero stride, not a copy."""
    views = [t.expand(n, c) for t in coefficients]
    return views, [s for t in views for s in t.stride()]


def row_moments_impl(x: Tensor, plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor]:
    n, c, length = _check_rows(x)
    acc = accumulation_dtype(x.dtype)
    if x.numel() == 0:  # zeros for rows of no values, as rowwise's torch path gives
        return x.new_zeros((n, c), dtype=acc), x.new_zeros((n, c), dtype=acc)
    return _reduce(_moments_kernel, (x,), x.stride(), x, acc, plan or plan_for(x), moments=True)


def row_grad_sums_impl(grad: Tensor, x: Tensor, centre: Tensor,
                       plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor]:
    n, c, length = _check_rows(x)
    _check_grad(grad, x)
    if x.numel() == 0:
        return x.new_zeros((n, c), dtype=centre.dtype), x.new_zeros((n, c), dtype=centre.dtype)
    (centre,), centre_strides = _coefficients(n, c, centre)
    strides = (*grad.stride(), *x.stride(), *centre_strides)
    return _reduce(_grad_sums_kernel, (grad, x, centre), strides, x, centre.dtype,
                   plan or plan_for(x), moments=False)


def row_normalize_impl(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor,
                       plan: Optional[Plan] = None) -> Tensor:
    n, c, length = _check_rows(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    plan = plan or plan_for(x)
    coefficients, strides = _coefficients(n, c, centre, scale, shift)
    _normalize_kernel[_grid(n, c, plan)](
        x, y, *coefficients, c, length, plan.chunk, *x.stride(), *y.stride(), *strides,
        BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, num_warps=NUM_WARPS)
    return y


def row_normalize_backward_impl(grad: Tensor, x: Tensor, centre: Tensor, a: Tensor, p: Tensor,
                                q: Tensor, plan: Optional[Plan] = None) -> Tensor:
    n, c, length = _check_rows(x)
    _check_grad(grad, x)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    plan = plan or plan_for(x)
    coefficients, strides = _coefficients(n, c, centre, a, p, q)
    _normalize_backward_kernel[_grid(n, c, plan)](
        grad, x, dx, *coefficients, c, length, plan.chunk,
        *grad.stride(), *x.stride(), *dx.stride(), *strides,
        BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, num_warps=NUM_WARPS)
    return dx


# Custom ops: what torch.compile sees (opaque, shapes from the fake implementations).
@torch.library.custom_op('norm_plugins::row_moments', mutates_args=())
def _row_moments_op(x: Tensor) -> Tuple[Tensor, Tensor]:
    return row_moments_impl(x)


@_row_moments_op.register_fake
def _(x):
    acc = accumulation_dtype(x.dtype)
    return x.new_empty(x.shape[:2], dtype=acc), x.new_empty(x.shape[:2], dtype=acc)


@torch.library.custom_op('norm_plugins::row_grad_sums', mutates_args=())
def _row_grad_sums_op(grad: Tensor, x: Tensor, centre: Tensor) -> Tuple[Tensor, Tensor]:
    return row_grad_sums_impl(grad, x, centre)


@_row_grad_sums_op.register_fake
def _(grad, x, centre):
    return (x.new_empty(x.shape[:2], dtype=centre.dtype),
            x.new_empty(x.shape[:2], dtype=centre.dtype))


@torch.library.custom_op('norm_plugins::row_normalize', mutates_args=())
def _row_normalize_op(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return row_normalize_impl(x, centre, scale, shift)


@_row_normalize_op.register_fake
def _(x, centre, scale, shift):
    return torch.empty_like(x)


@torch.library.custom_op('norm_plugins::row_normalize_backward', mutates_args=())
def _row_normalize_backward_op(grad: Tensor, x: Tensor, centre: Tensor, a: Tensor, p: Tensor,
                               q: Tensor) -> Tensor:
    return row_normalize_backward_impl(grad, x, centre, a, p, q)


@_row_normalize_backward_op.register_fake
def _(grad, x, centre, a, p, q):
    return torch.empty_like(x)


# The entry points of rowwise.py's dispatch: the op under torch.compile, a direct launch in eager.
def row_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of every row of ``x`` (N, C, L), in the accumulation dtype."""
    return (_row_moments_op if torch.compiler.is_compiling() else row_moments_impl)(x)


def row_grad_sums(grad: Tensor, x: Tensor, centre: Tensor) -> Tuple[Tensor, Tensor]:
    """``sum_l g`` and ``sum_l g * (x - centre)`` per row, in centre's dtype."""
    return (_row_grad_sums_op if torch.compiler.is_compiling() else row_grad_sums_impl)(
        grad, x, centre)


def row_normalize(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - centre) * scale + shift`` per row, in x's dtype and layout."""
    return (_row_normalize_op if torch.compiler.is_compiling() else row_normalize_impl)(
        x, centre, scale, shift)


def row_normalize_backward(grad: Tensor, x: Tensor, centre: Tensor, a: Tensor, p: Tensor,
                           q: Tensor) -> Tensor:
    """``g * a + (x - centre) * p + q`` per row, in x's dtype and layout."""
    compiling = torch.compiler.is_compiling()
    op = _row_normalize_backward_op if compiling else row_normalize_backward_impl
    return op(grad, x, centre, a, p, q)
