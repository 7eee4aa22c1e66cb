"""The four row-wise passes as single fused loops on the CPU, for float32 and half tensors: each is a small
function compiled once by torch.compile (inductor: one vectorized, multi-threaded C++ loop per pass,
shapes dynamic), so a pass reads x (and g) once and writes its result once, as GroupNorm's CPU
kernels do, where the ATen-op route of :mod:`norm_plugins.ops.rowwise` makes two or three passes.

    moments      shift ~ mean of x[n, c, :8]; mean = shift + sum (x - shift) / L, var from sum (x - shift)^2
    normalize    y  = (x - M) * A + B
    grad_sums    sum g,  sum g * (x - M)
    backward     dx = g * a + (x - M) * P + Q

Sums run in float32 within chunks of CHUNK (64) positions and in float64 over the chunks, and the moments
are shifted by the mean of each row's first values: means are exact to float32 precision of the
row's spread at any offset, no variance cancels, and the variance is as precise as GroupNorm's
(5e-7 relative at 2x256x67200). The first call of each pass
compiles it (seconds; inductor caches the result on disk for later processes); a variant that fails
to compile (no C++ compiler, an inductor bug) warns once and leaves the ATen-op route in charge of
it. ``NORM_PLUGINS_CPU_FUSION=off`` turns them off.
"""
import os
import warnings
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

ENV_VAR = 'NORM_PLUGINS_CPU_FUSION'
RECOMPILE_LIMIT = 64
# Inductor decides whether a loop runs on all threads from the sizes it first compiled for, and
# with dynamic shapes that decision stays: a pass compiled on a small tensor would then run on one
# thread forever. Always parallel, with the thread count read at run time.
INDUCTOR_OPTIONS = {'cpp.min_chunk_size': 1, 'cpp.dynamic_threads': True}
CHUNK = 64
SHIFT_SAMPLES = 8
# Inputs the fused loops take; they compute in float32 (half inputs are upcast as they are read).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COMPILED: Dict[str, Callable] = {}
# Variants (see _variant) that failed to compile: they take the ATen-op route from then on.
_FAILED: Set[tuple] = set()


def _row_sums(t: Tensor) -> Tensor:
    """Per-row sums of (N, C, L) ``t`` in float64, summed in float32 within chunks of CHUNK positions:
    float32 rounding then grows over CHUNK terms, not a whole row's, at float32 speed. (A row
    shorter than a chunk, one of whole chunks and one with a remainder each compile a variant.)"""
    # Channels-last rows are summed as the (N, L, C) tensor they are, the chunks split along L.
    rows = t.transpose(1, 2) if t.stride(1) == 1 and t.stride(2) != 1 else t
    axis = 1 if rows is not t else 2
    length = t.shape[2]
    chunks, rest = length // CHUNK, length % CHUNK
    if chunks == 0:
        return rows.sum(axis).to(torch.float64)
    body = rows.narrow(axis, 0, chunks * CHUNK) if rest else rows
    shape = list(rows.shape)
    shape[axis:axis + 1] = [chunks, CHUNK]
    sums = body.reshape(shape).sum(axis + 1).to(torch.float64).sum(axis)
    if rest:
        sums = sums + rows.narrow(axis, chunks * CHUNK, rest).to(torch.float64).sum(axis)
    return sums


def _moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    x = x.to(torch.float32)  # half inputs: upcast as the loop reads them
    # Shifted by the mean of each row's first SHIFT_SAMPLES values: close to the row's mean, so
    # sum d^2 / L - mean(d)^2 hardly cancels; x - shift is exact where |x| >> std (Sterbenz).
    shift = x[:, :, :SHIFT_SAMPLES].mean(2, keepdim=True)
    d = x - shift
    mean = _row_sums(d) / x.shape[2]
    var = (_row_sums(d * d) / x.shape[2] - mean * mean).clamp_min(0)
    return shift[:, :, 0].to(torch.float64) + mean, var.to(torch.float32)


def _normalize(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    y = (x.to(torch.float32) - centre.unsqueeze(-1)) * scale.unsqueeze(-1) + shift.unsqueeze(-1)
    return y.to(x.dtype)


def _grad_sums(grad: Tensor, x: Tensor, centre: Tensor) -> Tuple[Tensor, Tensor]:
    g = grad.to(torch.float32)
    # sum g straight in float32 (1e-6 relative over a 2x256x67200 row): two chunked sums in one
    # loop hit an inductor bug for N = 1 and L a multiple of CHUNK.
    return g.sum(2), _row_sums(g * (x.to(torch.float32) - centre.unsqueeze(-1))).to(torch.float32)


def _backward(grad: Tensor, x: Tensor, centre: Tensor, a: Tensor, p: Tensor, q: Tensor) -> Tensor:
    dx = (grad.to(torch.float32) * a.unsqueeze(-1) + (x.to(torch.float32) - centre.unsqueeze(-1)) * p.unsqueeze(-1)
          + q.unsqueeze(-1))
    return dx.to(x.dtype)


PASSES = {'moments': _moments, 'normalize': _normalize, 'grad_sums': _grad_sums, 'backward': _backward}


def applies(x: Tensor, *others: Tensor) -> bool:
    """Whether the pass over (N, C, L) ``x`` (and ``others``: g of x's dtype, float32 (N, C)
    coefficients) takes the fused loops: float32 or half x on the CPU, outside torch.compile/export
    tracing (which fuse the plain formulas themselves) and dispatch modes."""
    if os.environ.get(ENV_VAR, 'auto').strip().lower() == 'off':
        return False
    return (x.device.type == 'cpu' and x.dtype in DTYPES and x.numel() > 0
            and all(t.device.type == 'cpu' and t.dtype in (x.dtype, torch.float32) for t in others)
            and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None)


def _variant(name: str, args: Tuple[Tensor, ...]) -> tuple:
    """What tells compiled variants of a pass apart: dtypes, layouts, sizes of 1 and the row length
    against CHUNK (torch.compile guards on the same)."""
    x = args[1] if name in ('grad_sums', 'backward') else args[0]  # (g, x, ...) for the gradient passes
    layouts = tuple('ncl' if t.stride(2) == 1 else 'nlc' if t.stride(1) == 1 else 'strided'
                    for t in args if t.dim() == 3)
    length = x.shape[2]
    return (name, x.dtype, layouts, tuple(size == 1 for size in x.shape), length < CHUNK, length % CHUNK == 0)


def run(name: str, *args: Tensor) -> Optional[Tuple[Tensor, ...]]:
    """The compiled pass ``name`` on ``args`` ((N, C) coefficients made contiguous, so a broadcast
    one compiles no variant of its own), or ``None`` where it cannot be compiled: a variant that
    fails (no C++ compiler, an inductor bug for one layout) warns once and takes the ATen-op route
    from then on, the others keep their fused loops."""
    variant = _variant(name, args)
    if variant in _FAILED:
        return None
    args = tuple(a if a.dim() == 3 or a.is_contiguous() else a.contiguous() for a in args)
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(PASSES[name], dynamic=True, fullgraph=True, options=INDUCTOR_OPTIONS)
    try:
        # Sizes stay symbolic, but a size of 1 and each layout compile a variant of their own: up to
        # about 16 per pass, above torch.compile's default limit of 8.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return _COMPILED[name](*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure means: use the ATen ops
        if not _FAILED:
            warnings.warn(f'norm_plugins: a fused CPU pass could not be compiled ({type(error).__name__}: '
                          f'{str(error).splitlines()[0][:200]}); it takes the slower ATen-op route for inputs '
                          f'like these ({variant}). Set {ENV_VAR}=off to skip the attempts.', RuntimeWarning,
                          stacklevel=3)
        _FAILED.add(variant)
        return None
