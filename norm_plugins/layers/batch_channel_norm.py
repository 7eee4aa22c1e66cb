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
computes them with one statistics pass and one output pass, saving only x for backward.
"""
import warnings
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.batch_channel_norm_fn import (BatchChannelNormFunction, coefficients_from_batch,
                                         coefficients_from_constants)
from ..ops.distributed import all_reduce_sum_, sync_group
from ..ops.moments import batch_sums, instance_moments
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

    State-dict entries: ``weight``, ``bias`` (C), ``group_weight``, ``group_bias`` (G); large batch
    ``running_mean``, ``running_var``, ``num_batches_tracked``; micro batch ``estimated_mean``,
    ``estimated_var``, ``update_rate``. Loading a large-batch state dict into a micro-batch BCN
    takes its running statistics as the initial estimates (see :meth:`init_estimates_from`).
    """
    _abbr_ = 'bcn'

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 estimate: bool = False, update_rate: float = 0.02, sync: Optional[bool] = None,
                 group_size: Optional[int] = None):
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
        # Whether r == 0 has been checked since r was last set: the check reads r back from the
        # device, which is done once rather than at every forward.
        self._rate_checked = False

        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
            self.group_weight = nn.Parameter(torch.empty(num_groups))
            self.group_bias = nn.Parameter(torch.empty(num_groups))
        else:
            for param in ('weight', 'bias', 'group_weight', 'group_bias'):
                self.register_parameter(param, None)
        if estimate:
            self.register_buffer('estimated_mean', torch.zeros(num_features))
            self.register_buffer('estimated_var', torch.ones(num_features))
            self.register_buffer('update_rate', torch.tensor(float(update_rate)))
        if self.track_running_stats:
            self.register_buffer('running_mean', torch.zeros(num_features))
            self.register_buffer('running_var', torch.ones(num_features))
            self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))
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
        if rate == 0:
            self._rate_checked = False

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
        self._rate_checked = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _process_group(self):
        return sync_group(self.group_size) if self.sync else None

    def forward(self, x: Tensor) -> Tensor:
        check_norm_input(type(self).__name__, x, self.num_features)
        low_precision = x.dtype in (torch.float16, torch.bfloat16)
        # Statistics in float32 under AMP: the variances of low-precision activations lose too much.
        with torch.autocast(x.device.type, enabled=False):
            xs = x.float() if low_precision else x
            x3 = xs.reshape(xs.shape[0], xs.shape[1], xs.shape[2:].numel())
            with torch.no_grad():
                m, v, buffer = instance_moments(x3)
            coefficients, params = self._coefficients(m, v, x3.shape[2])
            with torch.no_grad():
                scale, shift, batch = coefficients(m, v, *params)
            if batch is not None and self.training and self.track_running_stats:
                self._update_running_stats(*batch, m.shape[0] * x3.shape[2])
            y = BatchChannelNormFunction.apply(x3, m, v, scale, shift, buffer, coefficients, *params)
            y = y.view(x.shape)
        return y.to(x.dtype) if low_precision else y

    def _coefficients(self, m: Tensor, v: Tensor, spatial: int):
        """The function giving (A, B) of ``y = A x + B`` from (m, v), and the tensors it takes."""
        dtype = m.dtype
        affine = ((self.weight.to(dtype), self.bias.to(dtype), self.group_weight.to(dtype),
                   self.group_bias.to(dtype)) if self.affine else (None,) * 4)
        if self.estimate or (self.track_running_stats and not self.training):
            if self.estimate:
                if self.training:
                    self._update_estimates(m, v, spatial)
                mean, var = self.estimated_mean, self.estimated_var
            else:
                mean, var = self.running_mean, self.running_var
            # Copies: constants of this graph, which a later training forward of the same layer
            # (a head shared across levels) updates in place before this graph's backward.
            coefficients = partial(coefficients_from_constants, groups=self.num_groups, eps=self.eps)
            return coefficients, (mean.to(dtype, copy=True), var.to(dtype, copy=True)) + affine
        group = self._process_group()
        if group is None and m.shape[0] * spatial <= 1 and self.training:
            raise ValueError(f'{type(self).__name__}(estimate=False) needs more than one value per '
                             f'channel to compute batch statistics, got {m.shape[0]} sample(s) of '
                             f'{spatial} position(s); use estimate=True (micro-batch BCN) for batches '
                             'this small.')
        coefficients = partial(coefficients_from_batch, spatial=spatial, groups=self.num_groups, eps=self.eps,
                               group=group)
        return coefficients, affine

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, total: Tensor, local_count: int) -> None:
        count = local_count if self._process_group() is None else float(total)
        if count <= 1:
            raise ValueError(f'{type(self).__name__}(estimate=False, sync=True) needs more than one '
                             f'value per channel over all ranks, got {int(count)}; use estimate=True '
                             '(micro-batch BCN) for batches this small.')
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        # Unbiased, as BatchNorm stores it.
        self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), factor)

    @torch.no_grad()
    def _update_estimates(self, m: Tensor, v: Tensor, spatial: int) -> None:
        """Steps 1-4 of Algorithm 1 from the per-(n, c) moments, averaged over the synchronized ranks."""
        if not self._rate_checked:
            self._rate_checked = True
            if float(self.update_rate) == 0:
                warnings.warn(f'{type(self).__name__}(estimate=True) is training with update_rate 0: its '
                              'estimated mean and variance never move. Set update_rate, or add '
                              "custom_hooks=[dict(type='BCNUpdateRateHook')] to follow the learning rate.")
        channels = m.shape[1]
        sums = batch_sums(m, v, spatial, centre=self.estimated_mean)
        group = self._process_group()
        all_reduce_sum_(sums, group)
        total = float(sums[-1]) if group is not None else m.shape[0] * spatial
        if total == 0:
            return
        mean = sums[:channels] / total
        sq_distance = sums[channels:2 * channels] / total  # from the previous estimated mean
        self.estimated_mean.lerp_(mean.to(self.estimated_mean.dtype), self.update_rate)
        self.estimated_var.lerp_(sq_distance.to(self.estimated_var.dtype), self.update_rate)

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
