"""Per-channel batch moments shared by the norm functions, derived from the per-(n, c) moments of
:func:`norm_plugins.ops.rowwise.row_moments` through sums that add up over ranks."""
from typing import Optional, Tuple

import torch
from torch import Tensor


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


def update_running_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, mean: Tensor,
                         var: Tensor, momentum: Optional[float], valid: Optional[Tensor] = None) -> None:
    """BatchNorm's running-statistics update, on the device (no host synchronization).

    ``momentum=None`` keeps a cumulative average over the batches counted. ``valid``, a boolean
    device scalar, masks the whole update: where it is False the buffers and ``num_batches_tracked``
    stay bit for bit as they were (an empty batch over all ranks); ``None`` always updates.
    """
    num_batches_tracked.add_(1 if valid is None else valid.to(num_batches_tracked.dtype))
    factor = momentum
    if factor is None:
        factor = num_batches_tracked.to(running_mean.dtype).clamp(min=1).reciprocal()
    for buffer, batch in ((running_mean, mean), (running_var, var)):
        updated = torch.lerp(buffer, batch.to(buffer.dtype), factor)
        buffer.copy_(updated if valid is None else torch.where(valid, updated, buffer))
