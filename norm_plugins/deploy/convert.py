"""Turning a trained model into an inference-only equivalent (eval outputs unchanged).

- WSConv -> plain convolution holding the standardized weight (:meth:`WSConv2d.fold`).
- SN/SyncSN with one-hot ratios (:meth:`SwitchableNorm.harden`), and SSN/SyncSSN whose ratio
  vectors froze (one-hot by training, or :meth:`SparseSwitchableNorm.harden`) -> the normalizer it
  selects: BN for mean and variance is a per-channel affine ``w / sqrt(running_var + eps) * (x - running_mean) + b``,
  folded into the convolution before it where the structure shows one (mmcv ``ConvModule``,
  mmdet/mmseg ResNet blocks' ``conv{i}``/``norm{i}``, consecutive ``nn.Sequential`` children), else a
  :class:`ChannelAffine`; IN -> ``nn.GroupNorm(C, C)``; LN -> ``nn.GroupNorm(1, C)``. A mean from one
  normalizer and a variance from another (or the unbiased instance variance), which no standard
  layer computes, and SN with soft ratios stay SN: the layer itself computes its statistics. Group
  SN (``ratio_groups`` > 1) converts the same way when all its channel groups select the same
  normalizers (LN statistics are over all channels in group SN too); groups selecting different
  ones stay SN.
- BCN (eval statistics constant: running statistics or micro-batch estimates) -> its per-channel
  part (Eq. 40) as an affine folded like BN's, then ``nn.GroupNorm(G, C)`` carrying the per-group
  affine repeated over each group's channels.
"""
from collections import Counter
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from ..layers.batch_channel_norm import BatchChannelNorm
from ..layers.sparse_switchable_norm import SparseSwitchableNorm
from ..layers.switchable_norm import NORMALIZERS, SwitchableNorm
from ..layers.weight_standardization import _WSConvMixin
from .modules import ChannelAffine, eval_affine

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _set(parent: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _conv_norm_pairs(model: nn.Module) -> Dict[int, Tuple[nn.Module, str]]:
    """``{id(norm): (parent, conv attribute)}`` for every norm that directly follows a convolution."""
    pairs: Dict[int, Tuple[nn.Module, str]] = {}
    for module in model.modules():
        order = getattr(module, 'order', None)
        norm_name = getattr(module, 'norm_name', None)
        if (isinstance(order, tuple) and norm_name and hasattr(module, 'conv') and 'conv' in order
                and 'norm' in order and order.index('conv') < order.index('norm')):
            pairs[id(getattr(module, norm_name))] = (module, 'conv')  # mmcv ConvModule
        for i in range(1, 4):
            norm_name = getattr(module, f'norm{i}_name', None)
            if isinstance(norm_name, str) and isinstance(getattr(module, f'conv{i}', None), nn.Module):
                pairs[id(getattr(module, norm_name))] = (module, f'conv{i}')  # mmdet/mmseg ResNet blocks, stem
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for conv_name, norm_name in zip(names, names[1:]):
                pairs[id(module._modules[norm_name])] = (module, conv_name)
    return pairs


@torch.no_grad()
def _fold_affine(conv: nn.Module, scale: Tensor, shift: Tensor) -> bool:
    """``affine(conv(x))`` as one convolution; False when ``conv`` is not a plain one of matching width."""
    if type(conv) not in _PLAIN_CONVS or conv.out_channels != scale.numel():
        return False
    weight = conv.weight.double() * scale.double().view((-1,) + (1,) * (conv.weight.dim() - 1))
    bias = shift.double() if conv.bias is None else conv.bias.double() * scale.double() + shift.double()
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))
    return True


def _one_hot_choices(layer: SwitchableNorm) -> Optional[Tuple[Set[str], Set[str]]]:
    """The normalizers the (mean, variance) ratio vectors select, over all channel groups (one name
    each when every group selects the same); None if any vector is not one-hot."""
    choices = []
    for ratios in layer.mixture_ratios():
        rows = ratios.detach().reshape(-1, len(NORMALIZERS))
        if bool((rows.max(-1).values != 1.0).any()):
            return None
        choices.append({NORMALIZERS[i] for i in rows.argmax(-1).tolist()})
    return choices[0], choices[1]


def _group_norm(groups: int, channels: int, eps: float, weight: Optional[Tensor], bias: Optional[Tensor],
                like: Tensor) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, channels, eps=eps, affine=weight is not None, device=like.device, dtype=like.dtype)
    if weight is not None:
        with torch.no_grad():
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
    return norm


def _convert_sn(layer: SwitchableNorm, fold) -> Tuple[Optional[nn.Module], str]:
    """The replacement of an SN or SSN layer and what it became (None: kept)."""
    kind = 'SSN' if isinstance(layer, SparseSwitchableNorm) else 'SN'
    choices = _one_hot_choices(layer)
    if choices is None:
        return None, f'{kind} kept (soft ratios; harden first)'
    if any(len(selected) > 1 for selected in choices):
        return None, f'{kind} kept (hard, channel groups select different normalizers: no standard layer)'
    choice = (next(iter(choices[0])), next(iter(choices[1])))
    if 'bn' in choice and not layer.track_running_stats:
        return None, f'{kind} kept (BN part uses batch statistics in eval)'
    like = layer.mean_weight
    if choice == ('bn', 'bn'):
        scale, shift = eval_affine(layer.running_mean, layer.running_var, layer.eps, layer.weight, layer.bias)
        if fold(scale, shift):
            return nn.Identity(), f'{kind}(BN) folded into conv'
        return ChannelAffine(scale.to(like.dtype), shift.to(like.dtype)), f'{kind}(BN) -> ChannelAffine'
    if choice[0] == choice[1] and not layer.unbiased_instance_var:
        groups = layer.num_features if choice[0] == 'in' else 1
        name = 'GroupNorm(C) (IN)' if choice[0] == 'in' else 'GroupNorm(1) (LN)'
        return (_group_norm(groups, layer.num_features, layer.eps, layer.weight, layer.bias, like),
                f'{kind} -> {name}')
    what = 'unbiased IN' if choice == ('in', 'in') else f'mean {choice[0].upper()}, var {choice[1].upper()}'
    return None, f'{kind} kept (hard, {what}: no standard layer)'


def _convert_bcn(layer: BatchChannelNorm, fold) -> Tuple[Optional[nn.Module], str]:
    if layer.estimate:
        mean, var = layer.estimated_mean, layer.estimated_var
    elif layer.track_running_stats:
        mean, var = layer.running_mean, layer.running_var
    else:
        return None, 'BCN kept (uses batch statistics in eval)'
    scale, shift = eval_affine(mean, var, layer.eps, layer.weight, layer.bias)
    per_group = layer.num_features // layer.num_groups
    weight = bias = None
    if layer.affine:
        weight = layer.group_weight.detach().repeat_interleave(per_group)
        bias = layer.group_bias.detach().repeat_interleave(per_group)
    like = mean
    group_norm = _group_norm(layer.num_groups, layer.num_features, layer.eps, weight, bias, like)
    if fold(scale, shift):
        return group_norm, 'BCN -> conv fold + GroupNorm'
    return nn.Sequential(ChannelAffine(scale.to(like.dtype), shift.to(like.dtype)), group_norm), \
        'BCN -> ChannelAffine + GroupNorm'


@torch.no_grad()
def deploy_model(model: nn.Module, harden: bool = False) -> Counter:
    """Convert ``model`` in place (and put it in eval mode); returns what each layer became.

    Args:
        harden: first fix every SN's ratios to their argmax (:meth:`SwitchableNorm.harden`; SSN:
            freeze its free vectors). That changes the outputs unless the model was finetuned with
            hard ratios (or its SSN vectors had all frozen).
    """
    model.eval()
    report: Counter = Counter()
    if harden:
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                module.harden()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _WSConvMixin):
                _set(parent, name, child.fold().eval())
                report['WSConv folded'] += 1
    pairs = _conv_norm_pairs(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (SwitchableNorm, BatchChannelNorm)):
                continue
            owner = pairs.get(id(child))

            def fold(scale, shift, owner=owner):
                return owner is not None and _fold_affine(getattr(owner[0], owner[1]), scale, shift)

            convert = _convert_sn if isinstance(child, SwitchableNorm) else _convert_bcn
            replacement, what = convert(child, fold)
            report[what] += 1
            if replacement is not None:
                _set(parent, name, replacement.eval())
    return report


def describe(report: Counter) -> List[str]:
    return [f'{what}: {count}' for what, count in sorted(report.items())]

