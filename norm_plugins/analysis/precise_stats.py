"""Batch-average statistics (SN paper Sec. 3, "Inference").

Instead of the moving averages kept during training, the batch part of SN is evaluated with the
plain average of the batch means and batch variances of K training mini-batches, fed through the
network with its parameters frozen::

    running_mean = 1/K sum_k mean_k,    running_var = 1/K sum_k var_k

Each layer stores its batch statistics as it does in training (SN: the variance it normalized
with; BCN: the unbiased variance, like BatchNorm). Only SN, SyncSN and large-batch BCN that are in
training mode are recomputed: layers the model keeps in eval mode while training (mmdet/mmseg
``frozen_stages``, ``norm_eval=True``, anything the user put in eval) would never update their
statistics in training either, so they keep them. Every other module runs in eval mode, so
BatchNorm, micro-batch BCN estimates and dropout stay as they are. In a distributed run every rank
feeds its own K batches (SyncSN and synchronized BCN see the global batch) and the averages are
then averaged over ranks.
"""
import itertools
from typing import Any, Callable, Iterable, List, Optional

import torch
import torch.distributed as dist
from mmengine.model import BaseModel, is_model_wrapper
from torch import nn

from ..layers.batch_channel_norm import BatchChannelNorm
from ..layers.switchable_norm import SwitchableNorm
from ..ops.distributed import is_distributed

FORWARD_MODES = ('loss', 'tensor')


def batch_stat_layers(model: nn.Module, training_only: bool = False) -> List[nn.Module]:
    """The layers whose eval statistics come from batches: SN/SyncSN with running statistics and
    large-batch BCN with running statistics; with ``training_only``, those in training mode."""
    return [m for m in model.modules()
            if ((isinstance(m, SwitchableNorm) and m.track_running_stats)
                or (isinstance(m, BatchChannelNorm) and not m.estimate and m.track_running_stats))
            and (m.training or not training_only)]


def forward_batch(model: nn.Module, batch: Any, mode: str = 'loss') -> Any:
    """One forward of a data-loader batch: through the data preprocessor for mmengine models
    (``mode='loss'`` sees the batch exactly as training does), else ``model(batch)``."""
    if isinstance(model, BaseModel):
        data = model.data_preprocessor(batch, True)
        if isinstance(data, dict):
            return model(**data, mode=mode)
        return model(*data, mode=mode)
    return model(batch)


@torch.no_grad()
def recompute_batch_stats(model: nn.Module, batches: Iterable, num_batches: int, mode: str = 'loss',
                          forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> int:
    """Replace the running statistics of every :func:`batch_stat_layers` layer in training mode by
    their batch average. Layers in eval mode (frozen stages, ``norm_eval``) keep their statistics and
    normalize with them while the others are recomputed, as in training.

    Args:
        model: the model (a DDP/MMDistributedDataParallel wrapper is unwrapped).
        batches: an iterable of training batches (a data loader); the first ``num_batches`` are used.
        num_batches: K, the number of batches to average (the authors use 200).
        mode: forward mode of mmengine models, ``'loss'`` (as in training) or ``'tensor'``.
        forward: ``forward(model, batch)`` overriding :func:`forward_batch`.

    Returns:
        The number of layers recomputed. Training flags and momenta are restored afterwards.

    Raises:
        ValueError: no such layer in training mode, ``num_batches < 1``, or fewer batches than asked for.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f'num_batches must be a positive int, got {num_batches!r}')
    if mode not in FORWARD_MODES:
        raise ValueError(f'mode must be one of {FORWARD_MODES}, got {mode!r}')
    if is_model_wrapper(model):
        model = model.module
    layers = batch_stat_layers(model, training_only=True)
    if not layers:
        if batch_stat_layers(model):
            raise ValueError('every SN, SyncSN and large-batch BCN of the model is in eval mode (frozen), so '
                             'none is recomputed; call model.train() first (frozen stages stay in eval)')
        raise ValueError('the model has no SN, SyncSN or large-batch BCN with running statistics; batch-average '
                         "statistics apply to norm_cfg=dict(type='SN'|'SyncSN') or dict(type='BCN', estimate=False)")
    run = forward or (lambda m, batch: forward_batch(m, batch, mode))
    training = {module: module.training for module in model.modules()}
    momenta = [layer.momentum for layer in layers]
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average: the k-th batch gets weight 1/k
            layer.train()
        seen = 0
        for batch in itertools.islice(batches, num_batches):
            run(model, batch)
            seen += 1
        if seen < num_batches:
            raise ValueError(f'asked for {num_batches} batches but the data loader gave {seen}; lower '
                             '--num-batches or use a larger training set')
        if is_distributed():
            _average_over_ranks(layers)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for module, flag in training.items():
            module.training = flag
    return len(layers)


def _average_over_ranks(layers: List[nn.Module]) -> None:
    stats = torch.cat([torch.cat([layer.running_mean, layer.running_var]).double() for layer in layers])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    stats /= dist.get_world_size()
    offset = 0
    for layer in layers:
        channels = layer.running_mean.numel()
        layer.running_mean.copy_(stats[offset:offset + channels])
        layer.running_var.copy_(stats[offset + channels:offset + 2 * channels])
        offset += 2 * channels
