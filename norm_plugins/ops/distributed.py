"""Process-group helpers shared by the synchronized norm layers (SyncSN, BCN).

Batch statistics are synchronized by all-reducing per-channel sums (count, sum, sum of squares),
so ranks may hold different, even zero, batch sizes.
"""
from typing import Dict, Optional

import torch
import torch.distributed as dist

_GROUPS: Dict[int, object] = {}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sync_group(group_size: Optional[int] = None):
    """The process group a synchronized layer reduces over, or ``None`` when there is nothing to sync.

    ``group_size=None`` means the whole world. Otherwise ranks are split into consecutive groups of
    ``group_size`` (the papers synchronize over the 8 GPUs of a node). ``dist.new_group`` is a
    collective, so all groups are created once, on first use, by every rank in the same order.
    """
    if not is_distributed():
        return None
    world = dist.get_world_size()
    if group_size is None or group_size >= world:
        return dist.group.WORLD
    if world % group_size:
        raise ValueError(f'group_size={group_size} does not divide the world size {world}; '
                         'choose a group_size that divides it, or None for the whole world.')
    if group_size == 1:
        return None
    if group_size not in _GROUPS:
        rank = dist.get_rank()
        for start in range(0, world, group_size):
            group = dist.new_group(list(range(start, start + group_size)))
            if start <= rank < start + group_size:
                _GROUPS[group_size] = group
    return _GROUPS[group_size]


def all_reduce_sum_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over ``group`` (no-op without one); no autograd."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (every rank consumes it)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return all_reduce_sum_(tensor.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum_(grad.contiguous().clone(), ctx.group), None


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ``group``; returns ``tensor`` itself without a group."""
    if group is None:
        return tensor
    return _AllReduceSum.apply(tensor, group)
