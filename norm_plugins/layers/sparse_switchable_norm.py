"""Sparse Switchable Normalization (Shao et al., "SSN: Learning Sparse Switchable Normalization via
SparsestMax", CVPR 2019) and its synchronized form.

SN's layer (:mod:`.switchable_norm`: the same statistics, options, kernels and deploy path) with the
ratios ``r = SparsestMax(mean_weight; radius)`` and ``r' = SparsestMax(var_weight; radius)``
(:mod:`norm_plugins.ops.sparsestmax`) instead of softmaxes. The radius grows during training
(:class:`~norm_plugins.hooks.SSNRadiusHook`), pushing every ratio vector to a vertex of the simplex,
so the trained layer selects one normalizer for its means and one for its variances.

Freezing. Once a ratio vector is one-hot it is frozen for good: ``mean_fixed``/``var_fixed`` hold
the index of its normalizer (-1 while free), the layer mixes with that constant one-hot vector, and
its logits get a zero gradient (SGD momentum or weight decay may still move them; they no longer
matter). ``mean_fixed_at``/``var_fixed_at`` record the training iteration (-1: free, or unknown).
The test runs on the device in every training forward that is not a checkpoint recomputation,
``fixed = where(one-hot & free, argmax, fixed)``, without reading a tensor on the host.

Statistics of one-hot layers. When every vector (all groups, means and variances) is frozen, forward
computes only what the choices need: one normalizer alone, only its statistics (no LN moments for
BN; no batch moments and no all-reduce for IN or LN); BN chosen nowhere, no batch moments. That
decision needs the frozen state on the host, so the layer keeps a host copy of it, refreshed where
a device read is acceptable: on ``load_state_dict`` (resume, ``load_from``), :meth:`harden`,
:meth:`reset_parameters` and by :class:`~norm_plugins.hooks.SSNRadiusHook` (one batched read for all
layers, every ``interval`` iterations; :func:`refresh_frozen`). Between refreshes the copy may lag
behind the device (a vector that froze since is still mixed, with its constant one-hot ratios: the
same output), never run ahead of it.
"""
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ..ops.recompute import is_recomputing
from ..ops.sparsestmax import one_hot_choice, sparsestmax
from .switchable_norm import SwitchableNorm, SyncSwitchableNorm

FREE = -1


class SparseSwitchableNorm(SwitchableNorm):
    """Sparse SN, ``norm_cfg=dict(type='SSN')``: SN with SparsestMax ratios that end one-hot.

    Takes every option of :class:`SwitchableNorm` (``normalizers`` with K = 1, 2 or 3 entries,
    ``tied``, ``ratio_groups``, ...) except ``hard_ratios``: SSN's ratios become hard by training;
    :meth:`harden` freezes them at once.

    Buffers besides SN's: ``radius`` (float32, 0-dim; set it with :meth:`set_radius`, or let
    :class:`~norm_plugins.hooks.SSNRadiusHook` follow the training progress), ``mean_fixed``,
    ``var_fixed`` (int64, (G,): -1 while free, else the index into :attr:`normalizers` of the frozen
    choice), ``mean_fixed_at``, ``var_fixed_at`` (int64, (G,): the training iteration at which the
    vector froze; -1 while free or when unknown). Tied layers have no ``var_*`` entries. All of them
    are in the state dict, so a resumed run continues with the same radius and frozen choices.
    ``iteration`` (non-persistent) is the iteration :meth:`set_radius` was last told.

    Eval mode mixes with SparsestMax at the current radius (no freezing there). With K = 1 the one
    ratio is 1 and the vectors are frozen from the start (``*_fixed_at`` -1).

    Under DistributedDataParallel every logit keeps receiving a (zero, once frozen) gradient, so
    ``find_unused_parameters`` is not needed.
    """
    _abbr_ = 'ssn'

    def __init__(self, num_features: int, **kwargs):
        if kwargs.get('hard_ratios'):
            raise ValueError(f"{type(self).__name__}: hard_ratios is SN's option; SSN's ratios become one-hot "
                             "during training (SSNRadiusHook). To finetune with fixed hard ratios use "
                             "norm_cfg=dict(type='SN', hard_ratios=True), or call harden() on the SSN layer.")
        super().__init__(num_features, **kwargs)
        device = self.mean_weight.device
        groups = self.ratio_groups
        self.register_buffer('radius', torch.zeros((), dtype=torch.float32, device=device))
        for vector in self._vector_names():
            self.register_buffer(f'{vector}_fixed', torch.full((groups,), FREE, dtype=torch.long, device=device))
            self.register_buffer(f'{vector}_fixed_at', torch.full((groups,), FREE, dtype=torch.long, device=device))
        self.register_buffer('iteration', torch.tensor(FREE, dtype=torch.long, device=device), persistent=False)
        self._reset_frozen()

    def _vector_names(self) -> Tuple[str, ...]:
        return ('mean',) if self.tied else ('mean', 'var')

    def _vectors(self) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """(logits, fixed, fixed_at) of each ratio vector kind (means, then variances unless tied)."""
        return [(getattr(self, f'{v}_weight'), getattr(self, f'{v}_fixed'), getattr(self, f'{v}_fixed_at'))
                for v in self._vector_names()]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if 'mean_fixed' in self._buffers:  # SwitchableNorm.__init__ resets before the buffers exist
            self._reset_frozen()

    @torch.no_grad()
    def _reset_frozen(self) -> None:
        # One normalizer: its ratio is 1 whatever the logits, frozen from the start.
        initial = 0 if len(self.normalizers) == 1 else FREE
        for _, fixed, fixed_at in self._vectors():
            fixed.fill_(initial)
            fixed_at.fill_(FREE)
        self._set_frozen_cache([initial] * (self.ratio_groups * len(self._vector_names())))

    def set_radius(self, radius: float, iteration: Optional[int] = None) -> None:
        """Set the SparsestMax radius (an absolute distance; values from sqrt((K-1)/K) on give one-hot
        ratios) and the training iteration that vectors freezing from now on record."""
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 <= radius < float('inf'):
            raise ValueError(f'{type(self).__name__}.set_radius: radius must be a finite number >= 0, got {radius!r}')
        if iteration is not None and (isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0):
            raise ValueError(f'{type(self).__name__}.set_radius: iteration must be an int >= 0 or None, '
                             f'got {iteration!r}')
        with torch.no_grad():
            self.radius.fill_(radius)
            self.iteration.fill_(FREE if iteration is None else iteration)

    @torch.no_grad()
    def harden(self) -> 'SparseSwitchableNorm':
        """Freeze every free ratio vector to its largest entry now (the first largest logit, which is
        also SparsestMax's largest ratio), recording :attr:`iteration` as the moment. Unlike SN's
        :meth:`~SwitchableNorm.harden` the logits stay parameters (with zero gradients). Returns
        ``self``."""
        k = len(self.normalizers)
        for logits, fixed, fixed_at in self._vectors():
            free = fixed < 0
            fixed.copy_(torch.where(free, logits.reshape(-1, k).argmax(-1), fixed))
            fixed_at.copy_(torch.where(free, self.iteration, fixed_at))
        self._refresh_selection()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_selection()

    @torch.no_grad()
    def _refresh_selection(self) -> None:
        """Copy the frozen state to the host (reads the device)."""
        self._set_frozen_cache(torch.cat([fixed for _, fixed, _ in self._vectors()]).tolist())

    def _set_frozen_cache(self, choices: List[int]) -> None:
        """Host copy of the frozen state: ``choices`` holds ``mean_fixed`` then ``var_fixed``."""
        self._frozen_choices = tuple(choices)
        frozen = all(c >= 0 for c in choices)
        self._all_frozen = frozen
        self._single_selection = self.normalizers[choices[0]] if frozen and len(set(choices)) == 1 else None
        self._bn_selected = not frozen or ('bn' in self.normalizers and self.normalizers.index('bn') in choices)

    def _selected_normalizer(self) -> Optional[str]:
        return self._single_selection

    def _uses_batch_moments(self) -> bool:
        return 'bn' in self.normalizers and self._bn_selected

    def mixing_inputs(self) -> Tuple[Tensor, Optional[Tensor], bool]:
        """SparsestMax ratios at the current radius, frozen vectors replaced by their one-hot choice."""
        k = len(self.normalizers)
        # Means and variances in one call: SparsestMax is a chain of small ops, launched once.
        ratios = sparsestmax(self._stacked_logits(), self.radius)
        fixed = torch.cat([fixed for _, fixed, _ in self._vectors()])
        # A comparison, not F.one_hot, which checks the indices on the host.
        chosen = (fixed.clamp(min=0).unsqueeze(-1) == torch.arange(k, device=fixed.device)).to(ratios.dtype)
        ratios = torch.where((fixed >= 0).unsqueeze(-1), chosen, ratios)
        shape = self.mean_weight.shape
        mean, *var = (r.reshape(shape) for r in ratios.split(self.ratio_groups))
        return mean, (var[0] if var else None), False

    def _stacked_logits(self) -> Tensor:
        """(G, K) mean logits, then (G, K) variance logits unless tied."""
        k = len(self.normalizers)
        return torch.cat([logits.reshape(-1, k) for logits, _, _ in self._vectors()])

    @torch.no_grad()
    def _freeze_one_hot(self) -> None:
        """Freeze the free vectors whose SparsestMax ratios are one-hot at the current radius."""
        one_hot, index = one_hot_choice(self._stacked_logits(), self.radius)
        for (_, fixed, fixed_at), now, choice in zip(self._vectors(), one_hot.split(self.ratio_groups),
                                                      index.split(self.ratio_groups)):
            newly = now & (fixed < 0)
            fixed.copy_(torch.where(newly, choice, fixed))
            fixed_at.copy_(torch.where(newly, self.iteration, fixed_at))

    def forward(self, x: Tensor) -> Tensor:
        # Not in eval, and not in the recomputation of gradient checkpointing: the original forward
        # froze already, and the recomputed one then mixes the same constant one-hot ratios.
        if self.training and not self._all_frozen and not is_recomputing():
            self._freeze_one_hot()
        return super().forward(x)


class SyncSparseSwitchableNorm(SparseSwitchableNorm, SyncSwitchableNorm):
    """Sparse SN whose BN statistics are synchronized exactly as SyncSN's,
    ``norm_cfg=dict(type='SyncSSN')``; ``group_size`` as :class:`SyncSwitchableNorm`. Ranks freeze
    identically: the logits and the radius are the same on every rank."""


def refresh_frozen(layers: Iterable[SparseSwitchableNorm]) -> None:
    """Refresh the host copy of the frozen state of ``layers`` with one device read per device
    (instead of one per layer)."""
    by_device = {}
    for layer in layers:
        by_device.setdefault(layer.mean_fixed.device, []).append(layer)
    for group in by_device.values():
        tensors = [torch.cat([fixed for _, fixed, _ in layer._vectors()]) for layer in group]
        values = torch.cat(tensors).tolist()
        start = 0
        for layer, tensor in zip(group, tensors):
            layer._set_frozen_cache(values[start:start + tensor.numel()])
            start += tensor.numel()
