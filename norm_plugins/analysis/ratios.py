"""SN importance ratios per layer: collection, grouping, table and divergences.

The papers study, per normalization layer, the mean ratios ``r`` and variance ratios ``r'`` over
(IN, LN, BN), the symmetric divergence ``D(r || r') = KL(r || r') + KL(r' || r)`` between them
("Do Normalization Layers Need to Be Distinct", Fig. 3c) and the same divergence between the ratios
of one layer in two differently trained models (Fig. 5).
"""
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers.switchable_norm import NORMALIZERS, SwitchableNorm

# KL terms divide by ratios that are exactly 0 for hard ratios and dropped normalizers; the floor
# keeps D finite (a one-hot pair disagreeing scores about 2 * 27.6).
_RATIO_FLOOR = 1e-12


@dataclass
class LayerRatios:
    """The ratios of one SN layer, laid out as (IN, LN, BN) with 0 for normalizers it does not use."""
    name: str
    group: str
    normalizers: Tuple[str, ...]
    mean: Tensor
    var: Tensor

    def choice(self, which: str) -> str:
        ratios = self.mean if which == 'mean' else self.var
        return NORMALIZERS[int(ratios.argmax())]

    def divergence(self) -> float:
        """``D(r || r')`` between this layer's mean and variance ratios."""
        return symmetric_kl(self.mean, self.var)


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


def _layer_ratios(name: str, layer: SwitchableNorm) -> LayerRatios:
    with torch.no_grad():
        mean, var = (r.float().cpu() for r in layer.mixture_ratios())
    return LayerRatios(_strip(name), group_of(name), layer.normalizers, mean, var)


def ratios_from_model(model: nn.Module) -> List[LayerRatios]:
    """Every SN/SyncSN of ``model`` in module order."""
    return [_layer_ratios(name, module) for name, module in model.named_modules()
            if isinstance(module, SwitchableNorm)]


# Logit counts of the authors' checkpoints: three (IN, LN, BN), or two without BN (using_bn=False).
_NORMALIZERS_BY_COUNT = {3: NORMALIZERS, 2: ('in', 'ln')}


def ratios_from_state_dict(state_dict: Mapping[str, Tensor]) -> List[LayerRatios]:
    """Every SN layer of a state dict, recognized by its ``mean_weight`` logits.

    Without the model the normalizers are inferred from the number of logits: 3 is (IN, LN, BN),
    2 is (IN, LN) as in the authors' ``using_bn=False`` models. Other subsets need the config.
    Each layer's ratios are those of an SN holding its logits (tied when it has no ``var_weight``).
    """
    layers = []
    for key, mean_logits in state_dict.items():
        if not (key == 'mean_weight' or key.endswith('.mean_weight')):
            continue
        prefix = key[:-len('mean_weight')]
        normalizers = _NORMALIZERS_BY_COUNT.get(mean_logits.numel())
        if normalizers is None:
            raise ValueError(f'{key} holds {mean_logits.numel()} logits; without the model their normalizers '
                             'are unknown. Pass the training config (--config) so the layers say which '
                             'normalizers they use.')
        var_logits = state_dict.get(prefix + 'var_weight')
        layer = SwitchableNorm(1, normalizers=normalizers, tied=var_logits is None, affine=False,
                               track_running_stats=False).double()
        with torch.no_grad():
            layer.mean_weight.copy_(mean_logits)
            if var_logits is not None:
                layer.var_weight.copy_(var_logits)
        layers.append(_layer_ratios(prefix.rstrip('.'), layer))
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
    rows = [(layer.name, layer.group, _fmt(layer.mean), _fmt(layer.var),
             f"{layer.choice('mean').upper()}/{layer.choice('var').upper()}", f'{layer.divergence():.4f}')
            for layer in layers]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ['  '.join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def _fmt(ratios: Tensor) -> str:
    return '/'.join(f'{float(r):.3f}' for r in ratios)


def compare_ratios(first: Sequence[LayerRatios],
                   second: Sequence[LayerRatios]) -> List[Tuple[LayerRatios, float, float]]:
    """Per layer present in both: ``(layer of first, D(mean_1 || mean_2), D(var_1 || var_2))``.

    Raises:
        ValueError: if the two models share no SN layer name.
    """
    others = {layer.name: layer for layer in second}
    rows = [(layer, symmetric_kl(layer.mean, others[layer.name].mean), symmetric_kl(layer.var, others[layer.name].var))
            for layer in first if layer.name in others]
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
