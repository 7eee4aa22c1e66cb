"""Statistics shared by the norm functions: per-(n, c) instance moments in one pass over x, and
per-channel batch moments derived from them through sums that add up over ranks."""
from typing import Optional, Tuple

import torch
from torch import Tensor

# Keeps 1 / sqrt(var + eps) finite for constant rows while leaving any real variance intact.
TINY = 1e-30


def instance_moments(xs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of every row xs[n, c, :] of (N, C, L), plus a free (N, C, L) buffer.

    The layer-norm kernel computes both moments in one vectorized Welford pass (accurate for large
    means, unlike E[x^2] - E[x]^2, and several times faster than ``var_mean`` on CPU); an empty batch
    gives empty moments. The normalized copy it also writes is reused as the output buffer: on CPU a
    fresh allocation of an activation costs more than the arithmetic on it.
    """
    buffer, mean, rstd = torch.native_layer_norm(xs, xs.shape[2:], None, None, TINY)
    var = (rstd.double().pow(-2) - TINY).clamp(min=0).to(xs.dtype)
    # The buffer is returned as is, never as a view: autograd forbids in-place ops (an inplace
    # ReLU after the norm) on views created inside a custom Function.
    return mean.squeeze(2), var.squeeze(2), buffer


def batch_sums(m: Tensor, v: Tensor, spatial: int, centre: Optional[Tensor] = None) -> Tensor:
    """Per-channel ``[sum x (C), sum (x - centre)^2 (C), count (1)]`` in float64, from (N, C) moments.

    Summable over ranks, which weights each rank by its element count (ranks may hold different or
    zero batches); float64 keeps ``E[x^2] - E[x]^2`` at float32 accuracy.
    """
    m64 = m.double()
    offset = m64 if centre is None else m64 - centre.double()
    return torch.cat([m64.sum(0) * spatial, (v.double() + offset * offset).sum(0) * spatial,
                      m64.new_full((1,), float(m.shape[0] * spatial))])


def moments_from_sums(sums: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance from (possibly all-reduced) :func:`batch_sums`."""
    channels = (sums.numel() - 1) // 2
    count = sums[-1].clamp(min=1)
    mean = sums[:channels] / count
    var = (sums[channels:2 * channels] / count - mean * mean).clamp(min=0)
    return mean.to(dtype), var.to(dtype)
