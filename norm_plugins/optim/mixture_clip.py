"""Gradient-norm clipping of the mixture logits alone, before every optimizer step: the SSN code
clips the ratio logits of all layers together at norm 1 (``clip_grad_norm_(ssn_params, 1.)`` in
Sparse_SwitchNorm ``train_imagenet.py``), and nothing else.

:class:`~norm_plugins.optim.NormAwareOptimWrapperConstructor` builds these wrappers when
``paramwise_cfg`` has ``mixture_clip_grad``; it flags the logits' parameter groups, and the wrapper
takes the flag off at construction (keeping the parameters themselves), so optimizer state dicts
and resumes are those of the plain wrapper.
"""
import math
from typing import List

import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper

# The parameter-group flag from the constructor to the wrapper.
MIXTURE_CLIP_FLAG = 'mixture_clip'


def check_mixture_clip_grad(value) -> dict:
    """``mixture_clip_grad``: ``dict(max_norm=..., norm_type=2.0)``, the arguments of
    ``torch.nn.utils.clip_grad_norm_``."""
    if not isinstance(value, dict) or 'max_norm' not in value or set(value) - {'max_norm', 'norm_type'}:
        raise ValueError(f'mixture_clip_grad must be dict(max_norm=..., norm_type=2.0) (clip_grad_norm_\'s '
                         f'arguments; the SSN code uses max_norm=1.0), got {value!r}')
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not number > 0 or math.isnan(number):
            raise ValueError(f'mixture_clip_grad.{key} must be a number > 0, got {number!r}')
    return dict(value)


class _MixtureClip:
    """Clips the gradients of the flagged parameter groups as one vector, after AMP's unscale and
    before the step (and before a configured ``clip_grad`` of all parameters). The norm before
    clipping is logged as ``mixture_grad_norm`` (a host read, like mmengine's ``grad_norm``).

    Args:
        mixture_clip_grad: ``dict(max_norm=..., norm_type=2.0)``.
        **kwargs: the base wrapper's.
    """

    def __init__(self, *args, mixture_clip_grad: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixture_clip_kwargs = check_mixture_clip_grad(mixture_clip_grad)
        self.mixture_params: List[torch.Tensor] = [
            param for group in self.optimizer.param_groups if group.pop(MIXTURE_CLIP_FLAG, False)
            for param in group['params']]

    def _unscale_for_clipping(self) -> None:
        """Bring the gradients to their true scale (AMP); nothing to do without a loss scaler."""

    def _clip_mixture(self) -> None:
        params = [p for p in self.mixture_params if p.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, **self.mixture_clip_kwargs)
            self.message_hub.update_scalar('train/mixture_grad_norm', float(norm))

    def _clip_grad(self) -> None:
        # The base step calls this, after AMP's unscale, when clip_grad is configured.
        self._clip_mixture()
        super()._clip_grad()

    def step(self, **kwargs) -> None:
        if not self.clip_grad_kwargs:  # then the base step clips nothing
            self._unscale_for_clipping()
            self._clip_mixture()
        super().step(**kwargs)


class MixtureClipOptimWrapper(_MixtureClip, OptimWrapper):
    """:class:`~mmengine.optim.OptimWrapper` that also clips the mixture logits' gradient norm."""


class MixtureClipAmpOptimWrapper(_MixtureClip, AmpOptimWrapper):
    """:class:`~mmengine.optim.AmpOptimWrapper` that also clips the mixture logits' gradient norm,
    after unscaling (a step the scaler skips for non-finite gradients stays skipped)."""

    def _unscale_for_clipping(self) -> None:
        self.loss_scaler.unscale_(self.optimizer)
