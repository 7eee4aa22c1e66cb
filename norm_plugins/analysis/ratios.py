"""SN importance ratios per layer: collection, grouping, table and divergences.

The papers study, per normalization layer, the mean ratios ``r`` and variance ratios ``r'`` over
(IN, LN, BN), the symmetric divergence ``D(r || r') = KL(r || r') + KL(r' || r)`` between them
("Do Normalization Layers Need to Be Distinct", Fig. 3c) and the same divergence between the ratios
of one layer in two differently trained models (Fig. 5).

A group-SN layer (``ratio_groups=G``) has one pair of ratio vectors per channel group; it appears
as G rows, ``name[0]`` ... ``name[G-1]``, each compared and averaged like a layer of its own.

Sparse SN (SSN) layers are SN layers whose ratios are SparsestMax's; their rows also carry the
SparsestMax radius and, per ratio vector, whether and at which training iteration it froze.
"""
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers.sparse_switchable_norm import SparseSwitchableNorm
from ..layers.switchable_norm import NORMALIZERS, SwitchableNorm

#: ``LayerRatios.frozen_at`` of a vector frozen at an iteration nobody recorded (SSN's ``*_fixed_at`` -1).
UNKNOWN_ITERATION = -1
# KL terms divide by ratios that are exactly 0 for hard ratios and dropped normalizers; the floor
# keeps D finite (a one-hot pair disagreeing scores about 2 * 27.6).
_RATIO_FLOOR = 1e-12


@dataclass
class LayerRatios:
    """The ratios of one SN layer (or of one channel group of a group-SN layer), laid out as
    (IN, LN, BN) with 0 for normalizers it does not use."""
    name: str
    group: str
    normalizers: Tuple[str, ...]
    mean: Tensor
    var: Tensor
    #: The channel group of a group-SN layer (None: the layer has one ratio vector pair).
    ratio_group: Optional[int] = None
    #: SSN only: the SparsestMax radius.
    radius: Optional[float] = None
    #: SSN only: when the (mean, variance) vector froze: None while free, the training iteration, or
    #: :data:`UNKNOWN_ITERATION` for a vector frozen at an unrecorded iteration (converted checkpoints).
    frozen_at: Optional[Tuple[Optional[int], Optional[int]]] = None

    @property
    def label(self) -> str:
        """The layer name, with ``[g]`` for the channel group of a group-SN layer."""
        return self.name if self.ratio_group is None else f'{self.name}[{self.ratio_group}]'

    def choice(self, which: str) -> str:
        ratios = self.mean if which == 'mean' else self.var
        return NORMALIZERS[int(ratios.argmax())]

    def divergence(self) -> float:
        """``D(r || r')`` between this layer's mean and variance ratios."""
        return symmetric_kl(self.mean, self.var)

    @property
    def is_sparse(self) -> bool:
        """Whether the row is an SSN layer's."""
        return self.frozen_at is not None


def symmetric_kl(p: Tensor, q: Tensor) -> float:
    """``KL(p || q) + KL(q || p)`` over the entries where either is non-zero (0 log 0 = 0)."""
    p, q = p.double(), q.double()
    used = (p > 0) | (q > 0)
    p, q = p[used].clamp(min=_RATIO_FLOOR), q[used].clamp(min=_RATIO_FLOOR)
    return float(((p - q) * (p.log() - q.log())).sum())


def group_of(name: str) -> str:
    """The part of the network a layer belongs to: backbone stage, neck, or head.

    ``backbone.layer2.0.sn1`` -> ``backbone.layer2``; ``backbone.sn1`` -> ``backbone.stem``;
    ``neck.*`` -> ``neck``; ``roi_head.mask_head.*`` -> ``roi_head.mask_head``; other heads by their
    first component (``rpn_head``, ``decode_head``, ``auxiliary_head``). Classification checkpoints
    without a ``backbone.`` prefix (the authors' ResNets) are grouped as ``layer1``... and ``stem``.
    """
    parts = name.split('.')
    if parts[0] == 'module':
        parts = parts[1:]
    if parts[0] == 'backbone':
        return 'backbone.' + _stage(parts[1:])
    if parts[0] == 'neck':
        return 'neck'
    if parts[0] == 'roi_head' and len(parts) > 2:
        return '.'.join(parts[:2])
    if len(parts) == 1 or _stage(parts) != 'stem':
        return _stage(parts)
    return parts[0]


def _stage(parts: Sequence[str]) -> str:
    path = '.'.join(parts)
    match = re.match(r'(layer\d+|stages?\.\d+|stage\d+|res_layers\.\d+)(\.|$)', path)
    return match.group(1) if match else 'stem'


def _frozen_at(layer: SparseSwitchableNorm) -> List[Tuple[Optional[int], Optional[int]]]:
    """Per channel group, (mean, variance) freezing iteration: None free, else the recorded iteration
    or UNKNOWN_ITERATION (tied layers: the one vector twice)."""
    def per_group(vector):
        fixed = getattr(layer, f'{vector}_fixed').tolist()
        at = getattr(layer, f'{vector}_fixed_at').tolist()
        return [None if f < 0 else (UNKNOWN_ITERATION if a < 0 else a) for f, a in zip(fixed, at)]
    mean = per_group('mean')
    return list(zip(mean, mean if layer.tied else per_group('var')))


def _layer_ratios(name: str, layer: SwitchableNorm) -> List[LayerRatios]:
    """One row per ratio vector pair: one for SN, one per channel group for group SN."""
    with torch.no_grad():
        mean, var = (r.float().cpu() for r in layer.mixture_ratios())
    name = _strip(name)
    groups = mean.reshape(-1, len(NORMALIZERS)).shape[0]
    sparse = isinstance(layer, SparseSwitchableNorm)
    radius = float(layer.radius) if sparse else None
    frozen = _frozen_at(layer) if sparse else [None] * groups
    if mean.dim() == 1:
        return [LayerRatios(name, group_of(name), layer.normalizers, mean, var, None, radius, frozen[0])]
    return [LayerRatios(name, group_of(name), layer.normalizers, m, v, g, radius, f)
            for g, (m, v, f) in enumerate(zip(mean, var, frozen))]


def ratios_from_model(model: nn.Module) -> List[LayerRatios]:
    """Every SN/SyncSN of ``model`` in module order (group SN: its groups in order)."""
    return [row for name, module in model.named_modules() if isinstance(module, SwitchableNorm)
            for row in _layer_ratios(name, module)]


# Logit counts of the authors' checkpoints: three (IN, LN, BN), or two without BN (using_bn=False).
_NORMALIZERS_BY_COUNT = {3: NORMALIZERS, 2: ('in', 'ln')}


def ratios_from_state_dict(state_dict: Mapping[str, Tensor]) -> List[LayerRatios]:
    """Every SN layer of a state dict, recognized by its ``mean_weight`` logits.

    Without the model the normalizers are inferred from the number of logits per ratio vector (the
    last dimension; group SN stores (G, K)): 3 is (IN, LN, BN), 2 is (IN, LN) as in the authors'
    ``using_bn=False`` models. Other subsets need the config. Each layer's ratios are those of an
    SN holding its logits (tied when it has no ``var_weight``); a layer with a ``radius`` is an SSN,
    whose ratios come from its logits, radius and frozen choices.
    """
    layers = []
    for key, mean_logits in state_dict.items():
        if not (key == 'mean_weight' or key.endswith('.mean_weight')):
            continue
        prefix = key[:-len('mean_weight')]
        if mean_logits.dim() not in (1, 2):
            raise ValueError(f'{key} has shape {tuple(mean_logits.shape)}; SN logits are (K,) or, for group SN, '
                             '(G, K). Is this an SN checkpoint?')
        groups, count = (1, mean_logits.numel()) if mean_logits.dim() == 1 else tuple(mean_logits.shape)
        normalizers = _NORMALIZERS_BY_COUNT.get(count)
        if normalizers is None:
            raise ValueError(f'{key} holds {count} logits per ratio vector; without the model their normalizers '
                             'are unknown. Pass the training config (--config) so the layers say which '
                             'normalizers they use.')
        var_logits = state_dict.get(prefix + 'var_weight')
        cls = SparseSwitchableNorm if prefix + 'radius' in state_dict else SwitchableNorm
        layer = cls(groups, normalizers=normalizers, tied=var_logits is None, affine=False,
                    track_running_stats=False, ratio_groups=groups).double()
        missing = [prefix + key for key in layer.state_dict() if prefix + key not in state_dict]
        if missing:
            raise ValueError(f'{prefix}radius marks an SSN layer, but its state lacks {missing}; the checkpoint is '
                             'not one of norm_plugins\' SSN (convert the authors\' files with '
                             'tools/convert_pretrained.py)')
        layer.load_state_dict({key: state_dict[prefix + key] for key in layer.state_dict()})
        layers.extend(_layer_ratios(prefix.rstrip('.'), layer))
    return layers


def _strip(name: str) -> str:
    return name[len('module.'):] if name.startswith('module.') else name


def group_means(layers: Sequence[LayerRatios]) -> Dict[str, Dict[str, Tensor]]:
    """Per group, the average (IN, LN, BN) mean and variance ratios of its layers, in order of appearance."""
    groups: Dict[str, List[LayerRatios]] = {}
    for layer in layers:
        groups.setdefault(layer.group, []).append(layer)
    return {group: {'mean': torch.stack([m.mean for m in members]).mean(0),
                    'var': torch.stack([m.var for m in members]).mean(0)}
            for group, members in groups.items()}


def ratio_table(layers: Sequence[LayerRatios]) -> str:
    """A text table: layer, group, mean ratios, variance ratios, hard choice, D(mean || var)."""
    header = ('layer', 'group', 'mean IN/LN/BN', 'var IN/LN/BN', 'hard mean/var', 'D(mean||var)')
    rows = [(layer.label, layer.group, _fmt(layer.mean), _fmt(layer.var),
             f"{layer.choice('mean').upper()}/{layer.choice('var').upper()}", f'{layer.divergence():.4f}')
            for layer in layers]
    if any(layer.is_sparse for layer in layers):
        # SSN: its radius and when each vector froze (iteration; '?' unrecorded, '-' still free).
        header += ('radius', 'frozen at mean/var')
        rows = [row + ((f'{layer.radius:.4f}', '/'.join(_iteration(at) for at in layer.frozen_at))
                       if layer.is_sparse else ('', '')) for row, layer in zip(rows, layers)]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ['  '.join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def _fmt(ratios: Tensor) -> str:
    return '/'.join(f'{float(r):.3f}' for r in ratios)


def _iteration(at: Optional[int]) -> str:
    return '-' if at is None else ('?' if at == UNKNOWN_ITERATION else str(at))


def frozen_summary(layers: Sequence[LayerRatios]) -> str:
    """How many SSN ratio vectors froze and to which normalizer, e.g. ``mean: 40/53 frozen (IN 3,
    LN 10, BN 27), var: ...``; empty without SSN rows."""
    sparse = [layer for layer in layers if layer.is_sparse]
    if not sparse:
        return ''
    parts = []
    for index, which in enumerate(('mean', 'var')):
        frozen = [layer.choice(which) for layer in sparse if layer.frozen_at[index] is not None]
        counts = ', '.join(f'{k.upper()} {frozen.count(k)}' for k in NORMALIZERS if k in frozen)
        parts.append(f'{which}: {len(frozen)}/{len(sparse)} frozen' + (f' ({counts})' if counts else ''))
    radii = sorted({layer.radius for layer in sparse})
    radius = f'radius {radii[0]:.4f}' if len(radii) == 1 else f'radius {radii[0]:.4f} to {radii[-1]:.4f}'
    return f'SSN ratio vectors ({radius}): ' + '; '.join(parts)


def compare_ratios(first: Sequence[LayerRatios],
                   second: Sequence[LayerRatios]) -> List[Tuple[LayerRatios, float, float]]:
    """Per layer (group-SN: per channel group) present in both: ``(layer of first, D(mean_1 || mean_2),
    D(var_1 || var_2))``.

    Raises:
        ValueError: if the two models share no SN layer name.
    """
    others = {layer.label: layer for layer in second}
    rows = [(layer, symmetric_kl(layer.mean, others[layer.label].mean), symmetric_kl(layer.var, others[layer.label].var))
            for layer in first if layer.label in others]
    if not rows:
        raise ValueError('the two checkpoints share no SN layer name; compare checkpoints of the same '
                         'architecture (same config).')
    return rows


def mean_divergence(rows: Sequence[Tuple[LayerRatios, float, float]]) -> Tuple[float, float]:
    """Average divergence over layers, for means and for variances."""
    count = len(rows)
    return (math.fsum(r[1] for r in rows) / count, math.fsum(r[2] for r in rows) / count)


def collect_ratios(checkpoint: str, config: Optional[str] = None,
                   cfg_options: Optional[dict] = None) -> List[LayerRatios]:
    """The SN layers of a checkpoint file: from the state dict, or from the model built by ``config``."""
    from .model_io import build_model, read_state_dict
    if config is None:
        layers = ratios_from_state_dict(read_state_dict(checkpoint))
    else:
        layers = ratios_from_model(build_model(config, checkpoint, cfg_options))
    if not layers:
        raise ValueError(f'{checkpoint} holds no SN layer (no mean_weight logits); ratios exist only for '
                         "models trained with norm_cfg=dict(type='SN') or 'SyncSN'.")
    return layers
