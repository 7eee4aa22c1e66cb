"""Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization
and Weight Standardization", Sec. 7, Eq. 40-43 and Algorithm 1).

For x of shape (N, C, *spatial), per channel c, then per sample n and group g of C / G channels::

    x' = weight_c * (x - mu_c) / sqrt(var_c + eps) + bias_c                          (Eq. 40)
    y  = group_weight_g * (x' - mu_ng) / sqrt(var_ng + eps) + group_bias_g           (Eq. 42)

``mu_ng``, ``var_ng`` are the (biased) moments of sample n over the channels of group g and all
positions: a group normalization without affine followed by a per-group affine. ``mu_c``, ``var_c``
are batch statistics, obtained in one of two ways:

- ``estimate=False`` (large batch, Eq. 43, BCN = CN(BN(x))): the batch moments over (N, *spatial)
  in training, running statistics (PyTorch momentum convention) in eval.
- ``estimate=True`` (micro batch, Algorithm 1): buffers ``estimated_mean`` (starts at 0) and
  ``estimated_var`` (starts at 1). Each training forward takes the batch mean ``m`` and the mean
  squared distance ``s`` of x from the *previous* estimated mean over (N, *spatial), moves the
  estimates toward them without gradients::

      estimated_mean += r * (m - estimated_mean)
      estimated_var  += r * (s - estimated_var)

  and normalizes with the updated estimates, held constant for autograd. Eval normalizes with the
  estimates and leaves them alone. The paper sets the update rate r to the learning rate of the
  trainable parameters: :class:`~norm_plugins.hooks.BCNUpdateRateHook` does that under an mmengine
  Runner; otherwise r is the ``update_rate`` buffer.

Both steps together are affine in x per (sample, channel); :mod:`norm_plugins.ops.batch_channel_norm_fn`
computes them with one statistics pass and one output pass (two passes in backward), saving only x.

Training details, as BatchNorm where it has them:

- An empty batch (N = 0) gives an empty output and changes no statistics, estimates or
  ``num_batches_tracked``; synchronized, so does a batch empty on every rank, or (large batch) one
  with a single value per channel over all ranks (no unbiased variance). Unsynchronized large-batch
  training with a single value per channel raises ``ValueError``. All of it without a host-device
  synchronization: checks on shapes, masks on the device.
- Gradient checkpointing (``with_cp=True``, ``torch.utils.checkpoint``): the recomputed forward
  inside backward updates nothing and normalizes with the constants of the original forward
  (see :meth:`BatchChannelNorm._check_recomputation` for a micro-batch layer run several times per
  step under the reentrant kind). Training forwards under ``torch.no_grad`` update as usual.
- Double backward is not supported and raises.
"""
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.batch_channel_norm_fn import BatchChannelNormFunction, BCNSpec
from ..ops.distributed import sync_group
from ..ops.recompute import is_recomputing
from .validation import check_group_size, check_norm_args, check_norm_input


class BatchChannelNorm(nn.Module):
    """Batch-Channel Normalization, ``norm_cfg=dict(type='BCN')``.

    Args:
        num_features: number of channels C.
        num_groups: number of channel groups G of the group normalization; must divide C.
        eps: added to every variance inside the square root.
        momentum: large-batch running-statistics factor, PyTorch convention
            (``running = (1 - momentum) * running + momentum * batch``); ``None`` keeps a
            cumulative average, as in BatchNorm. Unused with ``estimate=True``.
        affine: learn the per-channel ``weight``/``bias`` (gamma_b, beta_b) and the per-group
            ``group_weight``/``group_bias`` (gamma_c, beta_c).
        track_running_stats: large batch only: keep running statistics for eval; otherwise eval
            uses the batch statistics.
        estimate: ``False`` for large-batch BCN, ``True`` for micro-batch BCN (Algorithm 1).
        update_rate: initial r of Algorithm 1, in [0, 1]; 0.02 is mmdet's default SGD learning
            rate. Stored as a persistent buffer (checkpoints keep it).
        sync: synchronize batch statistics over ranks. With ``estimate=True`` the per-rank batch
            moments are averaged (weighted by element count) before every update, so estimates stay
            identical on all ranks; with ``estimate=False`` the batch statistics of the whole
            synchronized batch are used, with gradients, like SyncBN/SyncSN. ``None`` (default) means
            ``True`` for ``estimate=True`` and ``False`` otherwise. A no-op when not distributed.
        group_size: synchronize within groups of ``group_size`` consecutive ranks; ``None`` means
            the whole world.
        device, dtype: where and in which dtype parameters and buffers are created, as for
            ``nn.BatchNorm2d`` (``num_batches_tracked`` stays an int64).

    State-dict entries: ``weight``, ``bias`` (C), ``group_weight``, ``group_bias`` (G); large batch
    ``running_mean``, ``running_var``, ``num_batches_tracked``; micro batch ``estimated_mean``,
    ``estimated_var``, ``update_rate``. Loading a large-batch state dict into a micro-batch BCN
    takes its running statistics as the initial estimates (see :meth:`init_estimates_from`).
    """
    _abbr_ = 'bcn'

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 estimate: bool = False, update_rate: float = 0.02, sync: Optional[bool] = None,
                 group_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_norm_args(name, num_features, eps, momentum)
        if not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f'{name}: num_groups must be a positive int, got {num_groups!r}')
        if num_features % num_groups:
            raise ValueError(f'{name}: num_groups={num_groups} does not divide num_features={num_features}; '
                             f'choose num_groups among the divisors of {num_features} '
                             '(e.g. norm_cfg=dict(type=\'BCN\', num_groups=...)).')
        if not isinstance(estimate, bool):
            raise ValueError(f'{name}: estimate must be True (micro batch, Algorithm 1) or False '
                             f'(large batch), got {estimate!r}')
        if sync is not None and not isinstance(sync, bool):
            raise ValueError(f'{name}: sync must be True, False or None (default per mode), got {sync!r}')
        check_group_size(name, group_size)
        _check_update_rate(name, update_rate)
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.estimate = estimate
        self.track_running_stats = track_running_stats and not estimate
        self.sync = estimate if sync is None else sync
        self.group_size = group_size
        # r == 0 is checked where r is set, on the host value; the next training forward warns once.
        self._warn_zero_rate = estimate and update_rate == 0
        # Training forwards under no_grad since the last checkpoint recomputation (micro batch).
        self._no_grad_forwards = 0

        factory = dict(device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
            self.group_weight = nn.Parameter(torch.empty(num_groups, **factory))
            self.group_bias = nn.Parameter(torch.empty(num_groups, **factory))
        else:
            for param in ('weight', 'bias', 'group_weight', 'group_bias'):
                self.register_parameter(param, None)
        if estimate:
            self.register_buffer('estimated_mean', torch.zeros(num_features, **factory))
            self.register_buffer('estimated_var', torch.ones(num_features, **factory))
            self.register_buffer('update_rate', torch.tensor(float(update_rate), **factory))
        if self.track_running_stats:
            self.register_buffer('running_mean', torch.zeros(num_features, **factory))
            self.register_buffer('running_var', torch.ones(num_features, **factory))
            self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.estimate:
            self.estimated_mean.zero_()
            self.estimated_var.fill_(1)
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            for param in (self.weight, self.group_weight):
                nn.init.ones_(param)
            for param in (self.bias, self.group_bias):
                nn.init.zeros_(param)

    def set_update_rate(self, rate: float) -> None:
        """Set r of Algorithm 1 (what :class:`BCNUpdateRateHook` calls every iteration)."""
        if not self.estimate:
            raise RuntimeError(f'{type(self).__name__}: only estimate=True (micro batch) has an update '
                               'rate; large-batch BCN uses momentum.')
        _check_update_rate(type(self).__name__, rate)
        self.update_rate.fill_(float(rate))
        self._warn_zero_rate = rate == 0

    @torch.no_grad()
    def init_estimates_from(self, source: nn.Module) -> None:
        """Start the micro-batch estimates from ``source``'s running statistics.

        ``source`` is a BatchNorm or a large-batch BCN with running statistics, e.g. the layer of a
        large-batch checkpoint being finetuned with micro batches (loading such a state dict does
        this by itself).
        """
        name = type(self).__name__
        if not self.estimate:
            raise RuntimeError(f'{name}: init_estimates_from needs estimate=True; a large-batch BCN '
                               'keeps running statistics instead, load them with load_state_dict.')
        mean = getattr(source, 'running_mean', None)
        var = getattr(source, 'running_var', None)
        if mean is None or var is None:
            raise ValueError(f'{name}: {type(source).__name__} has no running statistics; pass a '
                             'BatchNorm or a large-batch BCN built with track_running_stats=True.')
        if mean.shape != self.estimated_mean.shape:
            raise ValueError(f'{name}: {type(source).__name__} has {mean.numel()} channels, this layer '
                             f'{self.num_features}.')
        self.estimated_mean.copy_(mean)
        self.estimated_var.copy_(var)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.estimate and prefix + 'estimated_mean' not in state_dict \
                and prefix + 'running_mean' in state_dict:
            # A large-batch checkpoint finetuned in micro-batch mode: its running statistics are the
            # best available estimates; r stays as constructed.
            state_dict[prefix + 'estimated_mean'] = state_dict.pop(prefix + 'running_mean')
            state_dict[prefix + 'estimated_var'] = state_dict.pop(prefix + 'running_var')
            state_dict.pop(prefix + 'num_batches_tracked', None)
            state_dict.setdefault(prefix + 'update_rate', self.update_rate.clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.estimate:
            # Loading is rare: reading r back from the device here spares every forward that sync.
            self._warn_zero_rate = bool(self.update_rate == 0)

    def _process_group(self):
        return sync_group(self.group_size) if self.sync else None

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        check_norm_input(name, x, self.num_features)
        batch_stats = not self.estimate and (self.training or not self.track_running_stats)
        group = self._process_group() if batch_stats or (self.estimate and self.training) else None
        rows = math.prod(x.shape[2:])
        if batch_stats and self.training and group is None and x.shape[0] * rows == 1:
            # As BatchNorm: one value per channel has no batch variance (a shape check, no host sync).
            raise ValueError(f'{name}(estimate=False) needs more than one value per channel to compute '
                             f'batch statistics, got {x.shape[0]} sample(s) of {rows} position(s); use '
                             'estimate=True (micro-batch BCN) for batches this small.')
        # A checkpointed block's recomputation in backward must not update statistics a second time.
        update = self.training and not is_recomputing()
        if self.estimate and self.training:
            self._check_recomputation(update)
        if batch_stats:
            mode = 'batch'
        elif self.estimate and update:
            self._warn_if_rate_zero()
            mode = 'estimate'
        else:
            mode = 'constant'
        running = [getattr(self, name, None) for name in ('running_mean', 'running_var', 'num_batches_tracked')]
        # The constants of 'constant' mode or the estimates 'estimate' mode updates; each buffer is
        # passed once (torch.compile traces no autograd function given one tensor twice).
        mean = var = None
        if self.estimate:
            mean, var = self.estimated_mean, self.estimated_var
        elif mode == 'constant':
            mean, var = running[:2]
        updating = mode == 'batch' and update and self.track_running_stats
        spec = BCNSpec(self.num_groups, self.eps, mode, updating, self.momentum, group)
        return BatchChannelNormFunction.apply(x, self.weight, self.bias, self.group_weight, self.group_bias, mean,
                                              var, getattr(self, 'update_rate', None),
                                              *(running if updating else [None] * 3), spec)

    def _check_recomputation(self, update: bool) -> None:
        """Micro-batch BCN under a reentrant checkpoint: its recomputed forward normalizes with the
        current estimates, which are those of the original forward only if no other training forward
        of this layer ran in between. The original forwards of the reentrant kind run under no_grad;
        count them (the non-reentrant kind keeps the original forward's constants itself)."""
        if update:
            self._no_grad_forwards = 0 if torch.is_grad_enabled() else self._no_grad_forwards + 1
            return
        forwards, self._no_grad_forwards = self._no_grad_forwards, 0
        if forwards > 1:
            raise RuntimeError(
                f'{type(self).__name__}(estimate=True) ran {forwards} training forwards under no_grad '
                '(reentrant gradient checkpointing) before this checkpoint recomputation, so it cannot '
                'tell which estimates the original forward used. Use a separate layer for each use '
                'within a step, or use_reentrant=False (torch.utils.checkpoint), which keeps them.')

    def _warn_if_rate_zero(self) -> None:
        if self._warn_zero_rate:
            self._warn_zero_rate = False
            warnings.warn(f'{type(self).__name__}(estimate=True) is training with update_rate 0: its '
                          'estimated mean and variance never move. Set update_rate, or add '
                          "custom_hooks=[dict(type='BCNUpdateRateHook')] to follow the learning rate.")

    def extra_repr(self) -> str:
        text = (f'{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, '
                f'affine={self.affine}, estimate={self.estimate}, sync={self.sync}')
        if self.estimate:
            return f'{text}, update_rate={float(self.update_rate):g}, group_size={self.group_size}'
        return (f'{text}, momentum={self.momentum}, track_running_stats={self.track_running_stats}, '
                f'group_size={self.group_size}')


def _check_update_rate(owner: str, rate) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ValueError(f'{owner}: update_rate must be a number in [0, 1] (the paper uses the learning '
                         f'rate), got {rate!r}')
