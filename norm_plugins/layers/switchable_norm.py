"""Switchable Normalization (Luo et al., "Differentiable Learning-to-Normalize via Switchable
Normalization") and its synchronized form.

    y = weight * (x - sum_k r_k mu_k) / sqrt(sum_k r'_k var_k + eps) + bias,   k in normalizers

``r = softmax(mean_weight)`` and ``r' = softmax(var_weight)`` mix instance (IN: per sample and
channel), layer (LN: per sample) and batch (BN: per channel) statistics. In eval mode IN and LN come
from the sample and BN from the running statistics. Works for (N, C, L), (N, C, H, W) and
(N, C, D, H, W) inputs.

Group SN (TPAMI paper, Sec. 3 "Variants of SN"): ``ratio_groups=G`` splits the channels into G
contiguous groups, each with its own mean and variance ratio vectors (logits of shape (G, K)); the
statistics keep their definitions (LN over all channels). G = 1 is the paper's layer, with (K,)
logits.

Hard ratios (the SN paper's sparse SN): :meth:`SwitchableNorm.harden` fixes each ratio vector to
the one-hot vector of its largest entry and stops training it.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.distributed import sync_group
from ..ops.recompute import is_recomputing
from ..ops.rowwise import as_rows, shaped_like
from ..ops.switchable_norm_fn import NORMALIZERS, SNSpec, SwitchableNormFunction
from .validation import check_group_size, check_norm_args, check_norm_input, check_ratio_groups

# Logit of the normalizers a hard ratio vector drops: next to a 0 logit its softmax is exactly 0
# (exp(-1e4) underflows in every float dtype), and it stays finite, so weight decay cannot make it NaN.
HARD_LOGIT = -1e4


class SwitchableNorm(nn.Module):
    """Switchable Normalization, ``norm_cfg=dict(type='SN')``.

    Args:
        num_features: number of channels C.
        eps: added to the mixed variance inside the square root.
        momentum: running-statistics update factor, PyTorch convention
            (``running = (1 - momentum) * running + momentum * batch``); ``None`` keeps a
            cumulative average, as in BatchNorm. The authors trained their models with 0.003.
        affine: learn a per-channel ``weight`` and ``bias``.
        track_running_stats: keep running BN statistics for eval; otherwise eval uses the batch.
        normalizers: non-empty subset of ('in', 'ln', 'bn'), stored in that canonical order
            (the order of the mixture logits in checkpoints). Without 'bn' the layer has no running
            statistics and does not depend on the batch (the authors' SN(8,1) models).
        tied: one ratio vector for means and variances (SN_tied); only ``mean_weight`` exists.
        zero_init: initialize ``weight`` to 0 (the authors' ``last_gamma``, for the last norm of
            a residual branch).
        unbiased_instance_var: divide the instance variance by L - 1 as the authors' released code
            does (LN and BN variances derived from it); with one spatial position there is nothing
            to correct and the biased value 0 is used, so 1x1 maps never give NaN.
        hard_ratios: build the layer hardened (see :meth:`harden`): the logits are buffers, and
            logits loaded from a checkpoint are hardened on load, so ``load_from`` a soft checkpoint
            finetunes with its argmax choices (``norm_cfg=dict(type='SN', hard_ratios=True)``).
            Until logits are loaded, the first of ``normalizers`` is selected.
        ratio_groups: G, the number of contiguous channel groups with their own ratio vectors
            (group SN); must divide ``num_features``. Logits are (K,) for G = 1, else (G, K).
        device, dtype: where and in which dtype parameters and buffers are created, as for
            ``nn.BatchNorm2d`` (``num_batches_tracked`` stays an int64).

    The running variance stores the batch variance exactly as it was used in training (biased,
    or derived from the unbiased instance variance), so eval normalizes like training did.

    Running statistics and ``num_batches_tracked`` move once per training forward, on the device
    (no host synchronization), except: for a batch without elements (N = 0; for SyncSN, over all
    ranks), which returns an empty output like BatchNorm; for the recomputation of gradient
    checkpointing (``with_cp=True``, :mod:`norm_plugins.ops.recompute`); and for a hardened layer
    whose BN ratios are 0, which computes no batch statistics. Training forwards under
    ``torch.no_grad`` (batch-average recomputation, ``swa_utils.update_bn``) do update. The output
    keeps the input's memory format (channels-last stays channels-last). Second derivatives are
    not implemented and raise.
    """
    _abbr_ = 'sn'

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 normalizers: Sequence[str] = NORMALIZERS, tied: bool = False,
                 zero_init: bool = False, unbiased_instance_var: bool = False, hard_ratios: bool = False,
                 ratio_groups: int = 1, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_norm_args(name, num_features, eps, momentum)
        check_ratio_groups(name, ratio_groups, num_features)
        self.normalizers = _canonical_normalizers(name, normalizers)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.tied = tied
        self.zero_init = zero_init
        self.unbiased_instance_var = unbiased_instance_var
        self.ratio_groups = ratio_groups
        self.hard_ratios = False
        self.track_running_stats = track_running_stats and 'bn' in self.normalizers

        factory = dict(device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter('weight', None)
            self.register_parameter('bias', None)
        shape = (len(self.normalizers),) if ratio_groups == 1 else (ratio_groups, len(self.normalizers))
        self.mean_weight = nn.Parameter(torch.ones(shape, **factory))
        self.var_weight = None if tied else nn.Parameter(torch.ones(shape, **factory))
        if self.track_running_stats:
            self.register_buffer('running_mean', torch.zeros(num_features, **factory))
            self.register_buffer('running_var', torch.ones(num_features, **factory))
            self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer('running_mean', None)
            self.register_buffer('running_var', None)
            self.register_buffer('num_batches_tracked', None)
        self.reset_parameters()
        if hard_ratios:
            self.harden()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.constant_(self.weight, 0.0 if self.zero_init else 1.0)
            nn.init.zeros_(self.bias)
        with torch.no_grad():
            for logits in self._mixture_logits().values():
                logits.fill_(1)
                if self.hard_ratios:
                    logits.copy_(_hard_logits(logits))
        if self.hard_ratios:
            self._refresh_selection()

    def _mixture_logits(self) -> Dict[str, Tensor]:
        return {name: getattr(self, name) for name in ('mean_weight', 'var_weight')
                if getattr(self, name) is not None}

    @torch.no_grad()
    def harden(self) -> 'SwitchableNorm':
        """Fix each ratio vector (each group's, for group SN) to the one-hot vector of its argmax
        (ties: the first normalizer).

        ``mean_weight``/``var_weight`` become buffers of the same name holding 0 for the selected
        normalizer and :data:`HARD_LOGIT` elsewhere: checkpoints keep their keys, the optimizer and
        weight decay no longer see them, and loading a checkpoint into the layer hardens its logits.
        Harden before wrapping the model in DistributedDataParallel (or build the layers with
        ``hard_ratios=True``), which registers the parameters it will reduce. Returns ``self``.
        """
        for name, logits in self._mixture_logits().items():
            delattr(self, name)
            self.register_buffer(name, _hard_logits(logits.detach()))
        self.hard_ratios = True
        self._refresh_selection()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.hard_ratios:
            for name in self._mixture_logits():
                if prefix + name in state_dict:
                    state_dict[prefix + name] = _hard_logits(state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.hard_ratios:
            self._refresh_selection()

    def mixing_inputs(self) -> Tuple[Tensor, Optional[Tensor], bool]:
        """What :class:`SwitchableNormFunction` mixes with: ``(mean, var, are_logits)``.

        ``mean``/``var`` have the logits' shape, (K,) or (G, K) over :attr:`normalizers`; ``var`` is
        ``None`` when tied. SN hands over its logits (``are_logits=True``: softmaxed inside the
        function, fused into the kernels); a subclass may hand over ratios with their own
        gradients instead (``False``), e.g. sparse SN's SparsestMax.
        """
        return self.mean_weight, self.var_weight, True

    def _used_ratios(self) -> Tuple[Tensor, Tensor]:
        """(mean, var) ratios over :attr:`normalizers`, shaped like the logits, with gradients."""
        mean, var, are_logits = self.mixing_inputs()
        if are_logits:
            mean = F.softmax(mean, -1)
            var = None if var is None else F.softmax(var, -1)
        return mean, (mean if var is None else var)

    def mixture_ratios(self) -> Tuple[Tensor, Tensor]:
        """The (mean, variance) ratio vectors the layer mixes with, laid out as (IN, LN, BN) with 0
        for unused normalizers (tied: the same vector twice): shape (3,), or (G, 3) for group SN.
        They carry gradients to the logits."""
        full = []
        for used in self._used_ratios():
            ratios = used.new_zeros(*used.shape[:-1], len(NORMALIZERS))
            ratios[..., [NORMALIZERS.index(k) for k in self.normalizers]] = used
            full.append(ratios)
        return full[0], full[1]

    def ratios(self) -> Dict[str, Dict[str, Tensor]]:
        """The importance ratios: ``{'mean': {'in': r, ...}, 'var': {...}}``; each ``r`` is a scalar
        tensor, or of shape (G,) for group SN."""
        with torch.no_grad():
            mean, var = self._used_ratios()
        return {'mean': dict(zip(self.normalizers, mean.unbind(-1))),
                'var': dict(zip(self.normalizers, var.unbind(-1)))}

    def _process_group(self):
        """None: batch statistics of this process only (SyncSN overrides)."""
        return None

    def _uses_batch_moments(self) -> bool:
        """Whether BN statistics enter the output: 'bn' is a normalizer and, once hardened, selected.

        A hardened layer whose BN ratios are exactly 0 computes no batch moments (SyncSN does not
        all-reduce) and leaves its running statistics alone. The selection is a Python flag set
        when the logits are hardened, reset or loaded, so forward never reads a tensor on the host
        (a GPU synchronization) and traces for export.
        """
        return 'bn' in self.normalizers and (not self.hard_ratios or self._bn_selected)

    def _selected_normalizer(self) -> Optional[str]:
        """The one normalizer that every mean and variance ratio vector selects, if there is one.

        Such a layer computes only that normalizer's statistics (IN: no LN or BN statistics and no
        all-reduce; BN: no LN statistics). Decided on the host from state refreshed when the
        ratios become hard (hardening, reset, loading), never by reading the device.
        """
        return self._single_selection if self.hard_ratios else None

    @torch.no_grad()
    def _refresh_selection(self) -> None:
        choices = torch.cat([t.argmax(-1).flatten() for t in self._mixture_logits().values()]).tolist()
        bn = self.normalizers.index('bn') if 'bn' in self.normalizers else -1
        self._bn_selected = bn in choices
        self._single_selection = self.normalizers[choices[0]] if len(set(choices)) == 1 else None

    def forward(self, x: Tensor) -> Tensor:
        check_norm_input(type(self).__name__, x, self.num_features)
        selected = self._selected_normalizer()
        if selected is None:
            normalizers, uses_bn = self.normalizers, self._uses_batch_moments()
            mean_mix, var_mix, are_logits = self.mixing_inputs()
        else:
            # One logit per vector, whose softmax is 1 with gradient 0: views of the layer's own logits.
            # They stay in the graph: sparse SN's logits remain parameters once frozen, and DDP without
            # find_unused_parameters expects a gradient for every parameter.
            normalizers, uses_bn = (selected,), selected == 'bn'
            index = self.normalizers.index(selected)
            mean_mix = self.mean_weight.narrow(-1, index, 1)
            var_mix = None if self.var_weight is None else self.var_weight.narrow(-1, index, 1)
            are_logits = True
        use_batch_stats = uses_bn and (self.training or not self.track_running_stats)
        # A checkpoint recomputation must not count the batch twice (see ops/recompute.py).
        update_stats = use_batch_stats and self.track_running_stats and not is_recomputing()
        spec = SNSpec(normalizers, are_logits, use_batch_stats, update_stats, self.momentum, self.eps,
                      self.unbiased_instance_var, self._process_group() if use_batch_stats else None)
        y = SwitchableNormFunction.apply(
            as_rows(x), self.weight, self.bias, mean_mix, var_mix,
            self.running_mean if uses_bn else None, self.running_var if uses_bn else None,
            self.num_batches_tracked, spec)
        # Not y.view(): torch.utils.checkpoint returns this output when SN ends a block that an
        # inplace ReLU follows (mmdet ResNet with_cp=True).
        return shaped_like(y, x)

    def extra_repr(self) -> str:
        return (f'{self.num_features}, normalizers={self.normalizers}, eps={self.eps}, '
                f'momentum={self.momentum}, affine={self.affine}, tied={self.tied}, '
                f'track_running_stats={self.track_running_stats}, '
                f'unbiased_instance_var={self.unbiased_instance_var}, hard_ratios={self.hard_ratios}'
                + (f', ratio_groups={self.ratio_groups}' if self.ratio_groups > 1 else ''))


class SyncSwitchableNorm(SwitchableNorm):
    """SN whose BN statistics are computed over the global batch, ``norm_cfg=dict(type='SyncSN')``.

    Instance and layer statistics stay per sample. The batch moments are all-reduced as
    per-channel sums and element counts, so ranks may hold different or zero batch sizes, and the
    output equals SN on the concatenation of all ranks' batches; gradients flow back through the
    reduction. Without an initialized process group (or with world size 1) it is exactly SN.

    Args:
        group_size: synchronize within groups of ``group_size`` consecutive ranks (the papers use
            the 8 GPUs of a node); ``None`` synchronizes the whole world.
        **kwargs: as :class:`SwitchableNorm`.
    """

    def __init__(self, num_features: int, group_size: Optional[int] = None, **kwargs):
        check_group_size(type(self).__name__, group_size)
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    def _process_group(self):
        return sync_group(self.group_size)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, group_size={self.group_size}'


def _hard_logits(logits: Tensor) -> Tensor:
    """Logits whose softmax is the one-hot vector of each row's argmax ((K,) or (G, K) logits)."""
    hard = torch.full_like(logits, HARD_LOGIT)
    return hard.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)


def _canonical_normalizers(owner: str, normalizers: Sequence[str]) -> tuple:
    if isinstance(normalizers, str):
        normalizers = (normalizers,)
    names = tuple(normalizers)
    unknown = [k for k in names if k not in NORMALIZERS]
    if unknown:
        raise ValueError(f'{owner}: unknown normalizers {unknown}; choose from {NORMALIZERS}')
    if not names:
        raise ValueError(f'{owner}: normalizers is empty; give a non-empty subset of {NORMALIZERS}')
    if len(set(names)) != len(names):
        raise ValueError(f'{owner}: normalizers {names} repeats a name; list each at most once')
    return tuple(k for k in NORMALIZERS if k in names)
