"""Plans and launches the Triton kernels (:mod:`norm_plugins.ops.triton_kernels`) of the four
row-wise passes of :mod:`norm_plugins.ops.rowwise`, whose torch path is the reference.

Tiles: the tile's fast axis follows x's unit stride (positions for NCL-contiguous x, channels for
channels-last x), which keeps loads coalesced for either layout. Its width along that axis is the
power of two that fits the row with least padding (:func:`fit_tile`): a row of L = 1050 (P5 of
800x1344) takes 9 tiles of 128 positions, not one of 2048 that is half masked.

Filling the GPU: with few long rows (2x64x400x672 is 128 rows of 268,800) one program per row
leaves most SMs idle, so :func:`make_plan` cuts every row into ``split`` chunks, enough for about
``PROGRAMS_PER_SM`` programs per SM, each of at least ``MIN_CHUNK_ELEMENTS``. The reductions then write per-chunk partials (mean and M2, or
plain sums; the counts follow from the plan) and one tiny launch merges them by Chan's formula; with
one chunk per row the reduction kernel writes the result itself.

Triton chooses between compiled kernels and its interpreter (``TRITON_INTERPRET=1``, for CPU
tensors) once per process, when ``triton`` is imported: set the variable before that import.

The public functions are torch custom ops (``torch.ops.norm_plugins.*``, opaque to
``torch.compile`` through their fake implementations). Eager calls skip the dispatcher and launch
directly: a custom op call costs about 15 us of host time, a noticeable share of a layer's budget on
a GPU.
"""
import contextlib
import functools
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from . import triton_kernels as kernels
from .backend import LAUNCH_LISTENERS
from .rowwise import MEAN_DTYPE, accumulation_dtype

# A tile of 2048 elements: 16 per thread at 4 warps (8 KB of float32 per load).
TILE = 2048
# Tiles of rows narrower than 256 hold 1024 elements: every row a thread touches brings its (N, C)
# coefficients into registers, and at 2048 a P6 row tile (64x32) needed 236 registers per thread
# in tools/triton_kernels_report.py (120 at 32x32).
NARROW_TILE = 1024
NUM_WARPS = 4
# Channels per tile when C is the unit-stride axis: 64 float32 are 256 contiguous bytes.
MAX_BLOCK_C_CHANNELS_LAST = 64
# The narrowest tile along the unit-stride axis: 32 float32 are one 128-byte line.
MIN_TILE_WIDTH = 32
# A tile width may pad a row by up to this fraction before a narrower one is preferred.
PADDING_ALLOWED = 1 / 8
# A sample of this many elements or more needs 64-bit indices.
INT32_LIMIT = 2**31
PROGRAMS_PER_SM = 4
# Rows are split only into chunks of at least this many elements: below it the combine launch
# costs more than the idle SMs (FPN levels from P4 down are never split).
MIN_CHUNK_ELEMENTS = 16384
# Without a CUDA device (the interpreter), plan as for an H100 so the tests run the GPU's plans.
DEFAULT_SM_COUNT = 132
MAX_SPLIT = 512


def launch(kernel, grid, device: torch.device, *args, num_warps: int = NUM_WARPS, **constexprs) -> None:
    """Launch ``kernel`` over ``grid`` on ``device``: Triton launches on the current CUDA device and
    stream, so a tensor on another device gets a guard that makes its device current. FP fusion is
    pinned on (Triton 3.10 turns its default off): the kernels rely on fused multiply-adds rounding
    ``(x - M) * A + B`` once. Listeners (:data:`~norm_plugins.ops.backend.LAUNCH_LISTENERS`) are
    entered around it; one whose context yields ``False`` keeps the kernel from running."""
    constexprs = dict(constexprs, num_warps=num_warps)
    with contextlib.ExitStack() as listening:
        answers = [listening.enter_context(listener(kernel, grid, args, constexprs))
                   for listener in LAUNCH_LISTENERS]
        if False not in answers:
            with _device_guard(device):
                kernel[grid](*args, enable_fp_fusion=True, **constexprs)


def _device_guard(device: torch.device):
    if device.type == 'cuda' and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
            block_c = fit_tile(c, MAX_BLOCK_C_CHANNELS_LAST)
            block_l = min(triton.next_power_of_2(length), TILE // block_c)
        else:
            block_l = fit_tile(length, TILE)
            block_c = min(triton.next_power_of_2(c), (TILE if block_l >= 256 else NARROW_TILE) // block_l)
    tiles = triton.cdiv(length, block_l)
    if split is None:
        groups = n * triton.cdiv(c, block_c)
        split = max(1, triton.cdiv(sm_count * PROGRAMS_PER_SM, max(groups, 1)))
        split = min(split, max(1, block_c * length // MIN_CHUNK_ELEMENTS))
    split = max(1, min(split, tiles, MAX_SPLIT))
    chunk = triton.cdiv(tiles, split) * block_l
    return Plan(block_c, block_l, triton.cdiv(length, chunk), chunk)


def fit_tile(size: int, widest: int) -> int:
    """The tile width for rows of ``size``: among ``widest``, a quarter of it, a sixteenth, ... (at
    least :data:`MIN_TILE_WIDTH`; a row shorter than that gets its next power of two), the widest
    that pads a row by at most :data:`PADDING_ALLOWED`, else the one that pads least. Steps of four
    rather than two keep the number of compiled variants down."""
    if size <= MIN_TILE_WIDTH:
        return triton.next_power_of_2(size)
    widths = [w for w in (widest >> shift for shift in range(0, widest.bit_length(), 2)) if w >= MIN_TILE_WIDTH]
    padded = {w: triton.cdiv(size, w) * w for w in widths}
    fitting = [w for w in widths if padded[w] <= size * (1 + PADDING_ALLOWED)]
    return fitting[0] if fitting else min(widths, key=lambda w: (padded[w], -w))


def index_flags(*tensors: Tensor) -> dict:
    """The kernels' INT64 and ROW_ALIGN launch flags for the full-size (N, C, L) tensors of a launch
    (see :mod:`norm_plugins.ops.triton_kernels`)."""
    extent = max(sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
                 for t in tensors)
    row_align = 1
    if all(t.shape[2] == 1 or t.stride(2) == 1 for t in tensors):
        # A hint only where it makes whole 16-byte vectors and Triton's own divisibility-by-16
        # specialization does not: one extra variant per kernel and dtype, not one per divisor.
        vector = 16 // min(t.element_size() for t in tensors)
        common = math.gcd(16, tensors[0].shape[2])  # the row ends are masked at L
        for t in tensors:
            common = math.gcd(common, t.stride(0), t.stride(1))
        row_align = vector if common % vector == 0 and common < 16 else 1
    return dict(INT64=extent >= INT32_LIMIT, ROW_ALIGN=row_align)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def plan_for(x: Tensor) -> Plan:
    return make_plan(tuple(x.shape), x.stride(), _sm_count(x.device))


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


def _reduce(kernel, inputs, strides, x: Tensor, out_dtype: torch.dtype, plan: Plan, moments: bool,
            flags: dict, first_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Launches a reduction kernel and, for split rows, the combine kernel: two (N, C) results, the
    first in ``first_dtype`` (default ``out_dtype``)."""
    n, c, length = x.shape
    out1 = x.new_empty((n, c), dtype=first_dtype or out_dtype)
    out2 = x.new_empty((n, c), dtype=out_dtype)
    final = plan.split == 1
    part = out2 if final else x.new_empty((2, n * c, plan.split), dtype=out_dtype)
    launch(kernel, _grid(n, c, plan), x.device, *inputs, out1, out2, part, n * c, c, length, plan.chunk,
           *strides, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, FINAL=final, **flags)
    if not final:
        block_s = triton.next_power_of_2(plan.split)
        block_r = min(triton.next_power_of_2(n * c), max(1, TILE // block_s))
        launch(kernels.combine_kernel, (triton.cdiv(n * c, block_r),), x.device,
               part, x, out1, out2, n * c, c, length, plan.chunk, plan.split, x.stride(0), x.stride(1),
               BLOCK_R=block_r, BLOCK_S=block_s, MOMENTS=moments)
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
        return x.new_zeros((n, c), dtype=MEAN_DTYPE), x.new_zeros((n, c), dtype=acc)
    return _reduce(kernels.moments_kernel, (x,), x.stride(), x, acc, plan or plan_for(x), True,
                   index_flags(x), MEAN_DTYPE)


def row_grad_sums_impl(grad: Tensor, x: Tensor, centre: Tensor,
                       plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor]:
    n, c, length = _check_rows(x)
    _check_grad(grad, x)
    if x.numel() == 0:
        return x.new_zeros((n, c), dtype=centre.dtype), x.new_zeros((n, c), dtype=centre.dtype)
    (centre,), centre_strides = _coefficients(n, c, centre)
    strides = (*grad.stride(), *x.stride(), *centre_strides)
    return _reduce(kernels.grad_sums_kernel, (grad, x, centre), strides, x, centre.dtype,
                   plan or plan_for(x), False, index_flags(grad, x))


def row_normalize_impl(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor,
                       plan: Optional[Plan] = None) -> Tensor:
    n, c, length = _check_rows(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    plan = plan or plan_for(x)
    coefficients, strides = _coefficients(n, c, centre, scale, shift)
    launch(kernels.normalize_kernel, _grid(n, c, plan), x.device,
           x, y, *coefficients, c, length, plan.chunk, *x.stride(), *y.stride(), *strides,
           BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, **index_flags(x, y))
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
    launch(kernels.normalize_backward_kernel, _grid(n, c, plan), x.device,
           grad, x, dx, *coefficients, c, length, plan.chunk,
           *grad.stride(), *x.stride(), *dx.stride(), *strides,
           BLOCK_C=plan.block_c, BLOCK_L=plan.block_l, **index_flags(grad, x, dx))
    return dx


# Custom ops: what torch.compile sees (opaque, shapes from the fake implementations).
@torch.library.custom_op('norm_plugins::row_moments', mutates_args=())
def _row_moments_op(x: Tensor) -> Tuple[Tensor, Tensor]:
    return row_moments_impl(x)


@_row_moments_op.register_fake
def _(x):
    return x.new_empty(x.shape[:2], dtype=MEAN_DTYPE), x.new_empty(x.shape[:2], dtype=accumulation_dtype(x.dtype))


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
