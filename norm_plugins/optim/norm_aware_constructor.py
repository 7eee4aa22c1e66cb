"""An optimizer-wrapper constructor that knows the plug-in norm layers.

mmengine's :class:`~mmengine.optim.DefaultOptimWrapperConstructor` applies ``norm_decay_mult`` only
to ``_BatchNorm``, ``_InstanceNorm``, ``GroupNorm`` and ``LayerNorm``. The SN papers' detection and
segmentation protocol sets weight decay 0 on every norm's gamma and beta and on the mixture logits,
so plug-in norms must be recognized too. The SSN code also clips the gradient norm of the ratio
logits alone (``mixture_clip_grad``, :mod:`.mixture_clip`).
"""
import logging
from typing import List, Optional, Union

from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

from ..layers.batch_channel_norm import BatchChannelNorm
from ..layers.switchable_norm import SwitchableNorm
from .mixture_clip import (MIXTURE_CLIP_FLAG, MixtureClipAmpOptimWrapper, MixtureClipOptimWrapper,
                           check_mixture_clip_grad)

PLUGIN_NORMS = (SwitchableNorm, BatchChannelNorm)
MIXTURE_LOGITS = ('mean_weight', 'var_weight')
# The wrapper that adds mixture-logit clipping to each supported optim_wrapper type.
_CLIPPING_WRAPPERS = {OptimWrapper: MixtureClipOptimWrapper, AmpOptimWrapper: MixtureClipAmpOptimWrapper}


class NormAwareOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """:class:`~mmengine.optim.DefaultOptimWrapperConstructor` that treats SN, SyncSN and BCN as
    normalization layers.

    Usage::

        optim_wrapper = dict(
            type='OptimWrapper',
            optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
            constructor='NormAwareOptimWrapperConstructor',
            paramwise_cfg=dict(norm_decay_mult=0., mixture_decay_mult=0.))

    ``paramwise_cfg`` takes every option of the default constructor, with these differences for
    the parameters of plug-in norms (``PLUGIN_NORMS``):

    - their affine parameters (SN ``weight``/``bias``, BCN ``weight``/``bias``/``group_weight``/
      ``group_bias``) are norm parameters: ``norm_decay_mult`` applies and ``bias_lr_mult`` does
      not, exactly as for ``nn.BatchNorm2d``;
    - ``mixture_lr_mult`` and ``mixture_decay_mult`` (new) set the learning rate and weight decay
      of SN's mixture logits ``mean_weight``/``var_weight``; without them the logits are treated as
      the layer's other norm parameters. SN, SSN and group SN ((G, K) logits) alike;
    - ``mixture_clip_grad=dict(max_norm=..., norm_type=2.0)`` (new) clips the gradient norm of all
      mixture logits together before each step, after AMP's unscale: the wrapper type
      ``OptimWrapper`` becomes :class:`~norm_plugins.optim.MixtureClipOptimWrapper` and
      ``AmpOptimWrapper`` (``--amp``) :class:`~norm_plugins.optim.MixtureClipAmpOptimWrapper`; a
      ``clip_grad`` of the wrapper still clips all parameters afterwards.

    The SSN code's settings (ratio logits at lr / 10, without weight decay, gradient norm clipped
    at 1)::

        paramwise_cfg=dict(norm_decay_mult=0., mixture_lr_mult=0.1, mixture_decay_mult=0.,
                           mixture_clip_grad=dict(max_norm=1.0))

    ``custom_keys`` keep precedence over all of these, as in the default constructor, except the
    clipping, which covers every mixture logit. Everything else (other modules, options, the built
    optimizer and wrapper) is the default constructor's.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        clip = self.paramwise_cfg.get('mixture_clip_grad')
        if clip is not None:
            self.optim_wrapper_cfg['type'] = _clipping_wrapper(self.optim_wrapper_cfg.get('type', 'OptimWrapper'))
            self.optim_wrapper_cfg['mixture_clip_grad'] = dict(clip)

    def _validate_cfg(self) -> None:
        super()._validate_cfg()
        for key in ('mixture_lr_mult', 'mixture_decay_mult'):
            value = self.paramwise_cfg.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                raise ValueError(f'paramwise_cfg.{key} must be a number >= 0, got {value!r}')
        if self.paramwise_cfg.get('mixture_clip_grad') is not None:
            try:
                check_mixture_clip_grad(self.paramwise_cfg['mixture_clip_grad'])
            except ValueError as err:
                raise ValueError(f'paramwise_cfg.{err}') from None
        if self.paramwise_cfg.get('mixture_decay_mult') is not None and self.base_wd is None:
            raise ValueError('paramwise_cfg.mixture_decay_mult needs optimizer.weight_decay to be set '
                             '(it multiplies it); add weight_decay to the optimizer config.')
        if self.paramwise_cfg.get('mixture_lr_mult') is not None and self.base_lr is None:
            raise ValueError('paramwise_cfg.mixture_lr_mult needs optimizer.lr to be set '
                             '(it multiplies it); add lr to the optimizer config.')

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        first_new = len(params)
        super().add_params(params, module, prefix, is_dcn_module)
        if isinstance(module, PLUGIN_NORMS):
            # The default constructor made one single-parameter group per parameter.
            self._treat_as_norm(params[first_new:], module, prefix)

    def _treat_as_norm(self, groups: List[dict], module: nn.Module, prefix: str) -> None:
        names = {id(param): name for name, param in module.named_parameters(recurse=False)}
        custom_keys = self.paramwise_cfg.get('custom_keys', {})
        norm_decay_mult = self.paramwise_cfg.get('norm_decay_mult')
        clip = self.paramwise_cfg.get('mixture_clip_grad') is not None
        for group in groups:
            name = names.get(id(group['params'][0]))
            if clip and name in MIXTURE_LOGITS:
                group[MIXTURE_CLIP_FLAG] = True
            # Same substring rule as the default constructor: a custom key wins over every rule.
            if name is None or any(key in f'{prefix}.{name}' for key in custom_keys):
                continue
            before = {k: v for k, v in group.items() if k != 'params'}
            decay_mult = norm_decay_mult
            if name in MIXTURE_LOGITS:
                mixture_lr_mult = self.paramwise_cfg.get('mixture_lr_mult')
                if mixture_lr_mult is not None:
                    group['lr'] = self.base_lr * mixture_lr_mult
                if self.paramwise_cfg.get('mixture_decay_mult') is not None:
                    decay_mult = self.paramwise_cfg['mixture_decay_mult']
            elif name == 'bias':
                # bias_lr_mult is for conv/linear biases, never a norm's beta.
                group.pop('lr', None)
            if decay_mult is not None and self.base_wd is not None:
                group['weight_decay'] = self.base_wd * decay_mult
            after = {k: v for k, v in group.items() if k != 'params'}
            if after != before:
                full_name = f'{prefix}.{name}' if prefix else name
                settings = ', '.join(f'{k}={v}' for k, v in after.items())
                print_log(f'paramwise_options -- {full_name} (norm layer): {settings or "defaults"}',
                          logger='current', level=logging.INFO)


def _clipping_wrapper(wrapper_type):
    """The mixture-clipping wrapper class for an ``optim_wrapper`` type (a registered name or class)."""
    cls = OPTIM_WRAPPERS.get(wrapper_type) if isinstance(wrapper_type, str) else wrapper_type
    if cls in _CLIPPING_WRAPPERS.values():
        return cls
    if cls not in _CLIPPING_WRAPPERS:
        raise ValueError(f'paramwise_cfg.mixture_clip_grad works with optim_wrapper type OptimWrapper or '
                         f'AmpOptimWrapper (it adds the clipping to them), got {wrapper_type!r}; drop '
                         'mixture_clip_grad or use one of those types.')
    return _CLIPPING_WRAPPERS[cls]
