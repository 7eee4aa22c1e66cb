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
layout. ``x`` and ``g`` may be NCL-contiguous or channels-last (stride 1 along C), independently.

Each function dispatches on :func:`norm_plugins.ops.backend.use_triton`: the Triton kernels for CUDA
tensors (or any tensor with ``NORM_PLUGINS_BACKEND=triton``), the torch implementation otherwise.
"""
from typing import Tuple

import torch
from torch import Tensor

from .backend import use_triton


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    """The Triton kernels, imported on first use: triton is optional."""
    from . import triton_rowwise
    return triton_rowwise


def row_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of every row of ``x``, in the accumulation dtype."""
    if use_triton(x):
        return _kernels().row_moments(x)
    var, mean = torch.var_mean(x.to(accumulation_dtype(x.dtype)), dim=2, correction=0)
    return mean, var


def row_normalize(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - centre) * scale + shift`` per row, in x's dtype and layout."""
    if use_triton(x):
        return _kernels().row_normalize(x, centre, scale, shift)
    xs = x.to(centre.dtype)
    y = (xs - centre.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).add_(shift.unsqueeze(-1))
    return _like(y, x)


def row_grad_sums(grad: Tensor, x: Tensor, centre: Tensor) -> Tuple[Tensor, Tensor]:
    """``sum_l g`` and ``sum_l g * (x - centre)`` per row, in the accumulation dtype."""
    if use_triton(x):
        return _kernels().row_grad_sums(grad, x, centre)
    gs = grad.to(centre.dtype)
    return gs.sum(2), (gs * (x.to(centre.dtype) - centre.unsqueeze(-1))).sum(2)


def row_normalize_backward(grad: Tensor, x: Tensor, centre: Tensor, a: Tensor, p: Tensor,
                           q: Tensor) -> Tensor:
    """``g * a + (x - centre) * p + q`` per row, in x's dtype and layout."""
    if use_triton(x):
        return _kernels().row_normalize_backward(grad, x, centre, a, p, q)
    xc = x.to(centre.dtype) - centre.unsqueeze(-1)
    dx = xc.mul_(p.unsqueeze(-1)).add_(q.unsqueeze(-1)).addcmul_(grad.to(centre.dtype), a.unsqueeze(-1))
    return _like(dx, x)


def _like(result: Tensor, x: Tensor) -> Tensor:
    """``result`` in x's dtype and strides (channels-last stays channels-last)."""
    out = torch.empty_like(x)
    out.copy_(result)
    return out
