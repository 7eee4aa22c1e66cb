"""Checks of an mmengine config against the manifest entries its modules load.

- :func:`check_backbone_fits`: the backbone config can hold the entry's weights (ResNet with a 7x7
  stem, same depth, style, norm and conv types); raises :class:`IncompatibleBackboneError`.
- :func:`check_layer_settings`: the settings that change what the layers compute without changing
  the state-dict layout (WS ``formula`` and ``eps``, SN ``unbiased_instance_var``, ``eps``) match
  the entry's; warns with :class:`PretrainedSettingsMismatchWarning`, naming the cfg to use.
- :func:`check_pretraining_batch`: the per-GPU finetuning batch matches the entry's images per GPU;
  warns with :class:`PretrainingBatchMismatchWarning`, citing the SN papers' finding.
- :func:`check_pretrained_config`: all three, for every ``norm_plugins://`` reference of a config.
"""
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mmengine.config import Config

from torch import nn

from ..layers.batch_channel_norm import BatchChannelNorm
from ..layers.switchable_norm import SwitchableNorm
from ..layers.weight_standardization import WSConv2d
from .errors import IncompatibleBackboneError
from .manifest import SCHEME, PretrainedEntry, get_entry, load_manifests

# mmdet/mmseg ResNet variants and the stem/shortcut they force.
_RESNET_TYPES = {'ResNet': (False, False), 'ResNetV1c': (True, False), 'ResNetV1d': (True, True)}
_FINDING = ('The SN papers (Luo et al.) found that the learned importance ratios follow the pretraining '
            'batch size and that finetuning from a different one degrades results (ResNet-50 finetuned '
            'at 2 images/GPU: COCO Mask R-CNN box AP 39.8 from SN(8,32) vs 41.0 from SN(8,2), ADE20K mIoU '
            '38.4 vs 39.2): "Using models that are pretrained and finetuned with comparable batch size '
            'would be a best practice for good results. Otherwise, performance may degenerate."')


# Per layer type: its class (for the defaults) and the settings that change its outputs but not its
# state-dict layout. Layout settings (SN normalizers/tied, GN/BCN num_groups, the types) are
# checked by check_backbone_fits.
_NUMERIC_SETTINGS = {
    'SN': (SwitchableNorm, ('eps', 'unbiased_instance_var')),
    'SyncSN': (SwitchableNorm, ('eps', 'unbiased_instance_var')),  # SyncSN passes them on to SN
    # SSN takes SN's options (**kwargs passed on), so SN's signature holds their defaults.
    'SSN': (SwitchableNorm, ('eps', 'unbiased_instance_var')),
    'SyncSSN': (SwitchableNorm, ('eps', 'unbiased_instance_var')),
    'BCN': (BatchChannelNorm, ('eps',)),
    'GN': (nn.GroupNorm, ('eps',)),
    'WSConv': (WSConv2d, ('eps', 'formula')),
}


class PretrainingBatchMismatchWarning(UserWarning):
    """The finetuning batch per GPU differs from the pretraining one of a batch-dependent backbone."""


class PretrainedSettingsMismatchWarning(UserWarning):
    """A setting that changes what the layers compute (WS formula, eps, SN's unbiased instance
    variance) differs from the one the pretrained weights were trained with."""


@dataclass(frozen=True)
class PretrainedReference:
    """A module of a config that loads ``norm_plugins://name``; ``where`` is its dotted config path."""
    where: str
    name: str
    module_cfg: Dict[str, Any]


@dataclass(frozen=True)
class BatchComparison:
    where: str
    name: str
    finetune_images_per_gpu: int
    pretrain_images_per_gpu: Optional[int]
    uses_batch_statistics: bool

    @property
    def matches(self) -> bool:
        return self.finetune_images_per_gpu == self.pretrain_images_per_gpu


def _scheme_name(value: Any) -> Optional[str]:
    if isinstance(value, str) and value.startswith(SCHEME):
        return value[len(SCHEME):]
    return None


def _init_cfg_names(init_cfg: Any) -> Iterator[str]:
    for item in (init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]):
        if isinstance(item, dict) and item.get('type') == 'Pretrained':
            name = _scheme_name(item.get('checkpoint'))
            if name is not None:
                yield name


def pretrained_references(model_cfg: Dict[str, Any], where: str = 'model') -> List[PretrainedReference]:
    """Every sub-config of ``model_cfg`` loading ``norm_plugins://NAME`` through ``init_cfg`` of type
    Pretrained, or through mmseg's model-level ``pretrained`` (which goes to the backbone)."""
    found = []
    if not isinstance(model_cfg, dict):
        return found
    for name in _init_cfg_names(model_cfg.get('init_cfg')):
        found.append(PretrainedReference(where, name, dict(model_cfg)))
    name = _scheme_name(model_cfg.get('pretrained'))
    if name is not None:
        backbone = model_cfg.get('backbone')
        if isinstance(backbone, dict):
            found.append(PretrainedReference(f'{where}.backbone', name, dict(backbone)))
        else:
            found.append(PretrainedReference(where, name, dict(model_cfg)))
    for key, value in model_cfg.items():
        if isinstance(value, dict):
            found.extend(pretrained_references(value, f'{where}.{key}'))
        elif isinstance(value, (list, tuple)) and key != 'init_cfg':
            for index, item in enumerate(value):
                found.extend(pretrained_references(item, f'{where}.{key}.{index}'))
    return found


# Norm types sharing one state-dict layout (the synchronized forms add no tensor).
_LAYOUT_FAMILY = {'SN': 'SN', 'SyncSN': 'SN', 'SSN': 'SSN', 'SyncSSN': 'SSN'}


def _ratio_groups(norm_cfg: Optional[Dict[str, Any]]) -> int:
    return int((norm_cfg or {}).get('ratio_groups', 1))


def _norm_signature(norm_cfg: Optional[Dict[str, Any]]) -> Tuple:
    """What of a norm config decides the state-dict layout."""
    cfg = dict(norm_cfg or {'type': 'BN'})
    norm_type = cfg.get('type')
    if norm_type in _LAYOUT_FAMILY:
        normalizers = cfg.get('normalizers', ('in', 'ln', 'bn'))
        normalizers = (normalizers,) if isinstance(normalizers, str) else normalizers
        return (_LAYOUT_FAMILY[norm_type], frozenset(normalizers), bool(cfg.get('tied', False)),
                _ratio_groups(cfg))
    if norm_type in ('GN', 'BCN'):
        return (norm_type, cfg.get('num_groups', 32 if norm_type == 'BCN' else None))
    return (norm_type,)


def check_backbone_fits(backbone_cfg: Dict[str, Any], entry: PretrainedEntry, where: str = 'backbone') -> None:
    """Raise :class:`IncompatibleBackboneError` unless ``backbone_cfg`` can hold ``entry``'s weights.

    The authors' ResNets have a 7x7 ``conv1`` stem and a conv+norm shortcut (mmdet/mmseg ``ResNet``
    with ``deep_stem=False, avg_down=False``); mmseg's default ``ResNetV1c`` (deep stem) and
    ``ResNetV1d`` (deep stem, average-pool shortcut) have other layers and cannot take them.
    """
    arch = entry.architecture
    backbone_type = backbone_cfg.get('type')
    source = f'{SCHEME}{entry.name}'
    prefix = f'{where} (type={backbone_type!r}) cannot load {source}'
    if backbone_type not in _RESNET_TYPES:
        raise IncompatibleBackboneError(
            f"{prefix}: the weights are a {arch['type']}-{arch['depth']}; use backbone type='ResNet'.")
    forced_deep_stem, forced_avg_down = _RESNET_TYPES[backbone_type]
    problems = []
    if backbone_cfg.get('deep_stem', forced_deep_stem) != arch['deep_stem']:
        problems.append(
            "it has a deep stem (three 3x3 convs, keys 'stem.*') while the checkpoint has the original "
            "7x7 'conv1' stem. Use type='ResNet' with deep_stem=False (mmseg: replace ResNetV1c by "
            "ResNet and keep its strides/dilations); the recipes must use a matching backbone"
            if not arch['deep_stem'] else 'the checkpoint has a deep stem and this backbone does not')
    if backbone_cfg.get('avg_down', forced_avg_down):
        problems.append("it down-samples shortcuts with average pooling (avg_down=True, keys "
                        "'downsample.1/2'); the checkpoint has conv+norm shortcuts: set avg_down=False")
    if backbone_cfg.get('depth') != arch['depth']:
        problems.append(f"depth={backbone_cfg.get('depth')} but the checkpoint is depth {arch['depth']}")
    if backbone_cfg.get('style', 'pytorch') != arch['style']:
        problems.append(f"style={backbone_cfg.get('style', 'pytorch')!r} puts the stride on another conv "
                        f"than the checkpoint was trained with; set style={arch['style']!r}")
    for key in ('stem_channels', 'base_channels'):
        if backbone_cfg.get(key, 64) != 64:
            problems.append(f'{key}={backbone_cfg[key]} but the checkpoint has 64')
    used, trained = _norm_signature(backbone_cfg.get('norm_cfg')), _norm_signature(entry.norm_cfg)
    if used[:-1] == trained[:-1] and used[0] in _LAYOUT_FAMILY.values():
        if used != trained:
            problems.append(_ratio_groups_problem(backbone_cfg.get('norm_cfg'), entry))
    elif used != trained:
        problems.append(f"norm_cfg={dict(backbone_cfg.get('norm_cfg') or {'type': 'BN'})} does not match "
                        f'the checkpoint\'s {entry.norm_cfg} (type, SN normalizers/tied, groups)')
    conv_type = (backbone_cfg.get('conv_cfg') or {}).get('type')
    if conv_type != (entry.conv_cfg or {}).get('type'):
        problems.append(f"conv_cfg={backbone_cfg.get('conv_cfg')} but the checkpoint was trained with "
                        f'conv_cfg={entry.conv_cfg}')
    if problems:
        raise IncompatibleBackboneError(prefix + ':\n  - ' + '\n  - '.join(problems))


def _ratio_groups_problem(norm_cfg: Dict[str, Any], entry: PretrainedEntry) -> str:
    """Why a group count differs from the checkpoint's, with the entries that would fit."""
    wanted, trained = _ratio_groups(norm_cfg), _ratio_groups(entry.norm_cfg)
    count = len(entry.norm_cfg.get('normalizers', ('in', 'ln', 'bn')))

    def shape(groups):
        return f'({count},)' if groups == 1 else f'({groups}, {count})'

    fitting = sorted(e.name for e in load_manifests().values()
                     if _norm_signature(e.norm_cfg) == _norm_signature(norm_cfg)
                     and e.architecture.get('depth') == entry.architecture.get('depth'))
    advice = (f'load one of {fitting} instead (the same kind of weights with {wanted} ratio group(s))' if fitting else
              f'convert the source into an entry with ratio_groups={wanted} (a single-group checkpoint is '
              'repeated over the groups: see pretrained_manifests/README.md)')
    return (f'norm_cfg has ratio_groups={wanted} (mixture logits {shape(wanted)} per layer) but the checkpoint\'s '
            f'layers have ratio_groups={trained} (logits {shape(trained)}): a non-strict load would leave them at '
            f'their initial values. Set ratio_groups={trained}, or {advice}')


def _setting(layer_cfg: Dict[str, Any], key: str) -> Any:
    """``layer_cfg[key]``, else the default of the layer type's constructor."""
    if key in layer_cfg:
        return layer_cfg[key]
    layer_class = _NUMERIC_SETTINGS[layer_cfg['type']][0]
    return inspect.signature(layer_class).parameters[key].default


def _cfg_text(layer_cfg: Dict[str, Any]) -> str:
    return 'dict(' + ', '.join(f'{k}={v!r}' for k, v in layer_cfg.items()) + ')'


def check_layer_settings(module_cfg: Dict[str, Any], entry: PretrainedEntry, where: str = 'backbone') -> List[str]:
    """Warn (:class:`PretrainedSettingsMismatchWarning`) for every setting of the module's ``norm_cfg``
    and ``conv_cfg`` that changes what a layer computes and differs from the entry's ``Method``
    (defaults of the layer classes filled in on both sides): the weights would be used with other
    arithmetic than they were trained with (another WS formula rescales every filter). The warning
    gives the ``norm_cfg``/``conv_cfg`` to use: the module's own with the entry's values.

    Returns the mismatches as ``'norm_cfg.KEY'``/``'conv_cfg.KEY'``. Layer types the entry does not
    share with the module are :func:`check_backbone_fits`' concern and are skipped here.
    """
    mismatches = []
    for field, trained in (('norm_cfg', entry.norm_cfg), ('conv_cfg', entry.conv_cfg)):
        used = dict(module_cfg.get(field) or {})
        types = (used.get('type'), (trained or {}).get('type'))
        if not all(t in _NUMERIC_SETTINGS for t in types) or \
                _NUMERIC_SETTINGS[types[0]][1] != _NUMERIC_SETTINGS[types[1]][1]:
            continue
        differ = {key: _setting(trained, key) for key in _NUMERIC_SETTINGS[used['type']][1]
                  if _setting(used, key) != _setting(trained, key)}
        if not differ:
            continue
        mismatches += [f'{field}.{key}' for key in differ]
        found = ', '.join(f'{key}={_setting(used, key)!r}' for key in differ)
        wanted = ', '.join(f'{key}={value!r}' for key, value in differ.items())
        warnings.warn(f'{where} loads {SCHEME}{entry.name}, whose layers were trained with {wanted}, but its '
                      f'{field} gives {found}: the pretrained weights would compute other values than they were '
                      f'trained to. Use {field}={_cfg_text({**used, **differ})}.',
                      PretrainedSettingsMismatchWarning, stacklevel=2)
    return mismatches


def _batch_size(cfg: Config) -> int:
    loader = cfg.get('train_dataloader')
    batch_size = loader.get('batch_size') if isinstance(loader, dict) else None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError('the config has no train_dataloader.batch_size (images per GPU) to compare with '
                         'the pretraining batch; set train_dataloader=dict(batch_size=..., ...)')
    return batch_size


def _alternatives(entry: PretrainedEntry, images_per_gpu: int) -> List[str]:
    # Alternatives must hold the same layers: same norm layout (SN vs SSN, ratio groups, ...) and depth.
    signature = _norm_signature(entry.norm_cfg)
    return sorted(e.name for e in load_manifests().values()
                  if e.name != entry.name and e.images_per_gpu == images_per_gpu
                  and _norm_signature(e.norm_cfg) == signature
                  and e.architecture.get('depth') == entry.architecture.get('depth'))


def check_pretraining_batch(cfg: Config) -> List[BatchComparison]:
    """Compare the per-GPU finetuning batch with each referenced entry's images per GPU.

    ``train_dataloader.batch_size`` is per GPU in mmengine. For entries whose norms use batch
    statistics (SN with 'bn', BCN) a difference, or an unknown pretraining batch, is warned about
    with :class:`PretrainingBatchMismatchWarning`; GN (+WS) and SN without 'bn' do not depend on it,
    nor does a module finetuned with micro-batch BCN (``estimate=True``): Algorithm 1 estimates the
    batch statistics across steps, the BCN paper's way of finetuning large-batch models at 1-2
    images per GPU.

    Returns:
        one :class:`BatchComparison` per ``norm_plugins://`` reference, in config order.
    """
    references = pretrained_references(cfg.get('model') or {})
    if not references:
        return []
    finetune = _batch_size(cfg)
    results = []
    for ref in references:
        entry = get_entry(ref.name)
        depends = entry.uses_batch_statistics and not _micro_batch_bcn(ref.module_cfg)
        result = BatchComparison(ref.where, entry.name, finetune, entry.images_per_gpu, depends)
        results.append(result)
        if not result.uses_batch_statistics or result.matches:
            continue
        head = f'{ref.where} loads {SCHEME}{entry.name}, '
        if entry.images_per_gpu is None:
            warnings.warn(head + f"whose images per GPU in pretraining are unknown "
                          f"({entry.unknown_reason('Metadata.Images Per GPU')}), so the finetuning batch of "
                          f'{finetune} images per GPU cannot be checked against it. ' + _FINDING,
                          PretrainingBatchMismatchWarning, stacklevel=2)
            continue
        better = _alternatives(entry, finetune)
        advice = (f' Entries pretrained with {finetune} images per GPU: {better}.' if better else
                  f' No manifest entry of this kind was pretrained with {finetune} images per GPU; '
                  'consider finetuning with the pretraining batch or registering a matching backbone '
                  '(tools/register_pretrained.py).')
        warnings.warn(head + f'pretrained with {entry.images_per_gpu} images per GPU, but '
                      f'train_dataloader.batch_size is {finetune} images per GPU. ' + _FINDING + advice,
                      PretrainingBatchMismatchWarning, stacklevel=2)
    return results


def _micro_batch_bcn(module_cfg: Dict[str, Any]) -> bool:
    norm_cfg = module_cfg.get('norm_cfg') or {}
    return norm_cfg.get('type') == 'BCN' and bool(norm_cfg.get('estimate', False))


def check_pretrained_config(cfg: Config) -> List[BatchComparison]:
    """Check every ``norm_plugins://`` reference of ``cfg``: the module fits the weights (raises
    :class:`IncompatibleBackboneError`), its layers compute what they were trained with (warns, see
    :func:`check_layer_settings`), and the finetuning batch matches (warns)."""
    for ref in pretrained_references(cfg.get('model') or {}):
        entry = get_entry(ref.name)
        check_backbone_fits(ref.module_cfg, entry, ref.where)
        check_layer_settings(ref.module_cfg, entry, ref.where)
    return check_pretraining_batch(cfg)


__all__ = ['BatchComparison', 'PretrainedReference', 'PretrainedSettingsMismatchWarning',
           'PretrainingBatchMismatchWarning', 'check_backbone_fits', 'check_layer_settings',
           'check_pretrained_config', 'check_pretraining_batch', 'pretrained_references']
