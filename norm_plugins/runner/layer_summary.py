"""Which norm_plugins layers a built model contains, so a run shows its config took effect."""
from collections import Counter
from typing import Dict

from mmengine.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

OTHER_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def plugin_layer_types() -> Dict[type, str]:
    """Every class norm_plugins registered on the root MODELS registry, with its registered name.

    A class registered under several names (``WSConv`` and ``WSConv2d``) keeps the first one.
    """
    names: Dict[type, str] = {}
    for name, cls in MODELS.module_dict.items():
        if cls.__module__.split('.')[0] == 'norm_plugins':
            names.setdefault(cls, name)
    return names


def count_layers(model: nn.Module) -> Dict[str, Counter]:
    """``{'plugin': Counter(registered name -> count), 'other_norm': Counter(class name -> count)}``.

    Counts by exact type, so SyncSN is not also counted as SN.
    """
    plugins = plugin_layer_types()
    counts = {'plugin': Counter(), 'other_norm': Counter()}
    for module in model.modules():
        kind = type(module)
        if kind in plugins:
            counts['plugin'][plugins[kind]] += 1
        elif isinstance(module, OTHER_NORMS):
            counts['other_norm'][kind.__name__] += 1
    return counts


def _format(counter: Counter) -> str:
    return ', '.join(f'{name} x{n}' for name, n in sorted(counter.items())) or 'none'


def describe_layers(model: nn.Module) -> str:
    """One line: the norm_plugins layers by type, then any other normalization layers."""
    counts = count_layers(model)
    return (f"norm_plugins layers in the model: {_format(counts['plugin'])}; "
            f"other normalization layers: {_format(counts['other_norm'])}")
