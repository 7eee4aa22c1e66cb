"""Conversion of the authors' ImageNet checkpoints into mmdet/mmseg ``ResNet`` state dicts.

Every source layout is a torchvision-like ResNet (7x7 stem ``conv1`` + norm, ``layerX.Y.convZ``,
shortcut ``downsample.0`` conv and ``downsample.1`` norm, classifier ``fc``), possibly wrapped in
``{'state_dict': ...}`` and prefixed with ``module.`` (DataParallel). The layouts differ in the norm
layers:

- ``sn_resnet`` (Switchable-Normalization): norms ``sn1/sn2/sn3`` with ``weight``/``bias`` of shape
  (1, C, 1, 1), ``mean_weight``/``var_weight`` logits [IN, LN, BN] (2 logits without BN), and
  ``running_mean``/``running_var`` of shape (1, C, 1) (absent without BN); no ``num_batches_tracked``.
- ``gn_ws_resnet`` (WeightStandardization / pytorch-classification): ``nn.GroupNorm`` weights (C,)
  under ``bn1/bn2/bn3``; OpenMMLab's re-hosted copies name them ``gn1/gn2/gn3``; both are read.
- ``bcn_ws_resnet`` (Batch-Channel-Normalization, imagenet code): norms ``bn1/bn2/bn3`` holding the
  per-group affine ``weight``/``bias`` of shape (1, G, 1) and the batch part as a BatchNorm2d
  submodule ``pbn`` (``bn`` in the README's ``BCNorm``) with per-channel weight, bias and running
  statistics.
- ``ssn_resnet`` (Sparse_SwitchNorm, ``SSN2d``): the ``sn_resnet`` names and shapes, plus
  ``mean_fixed``/``var_fixed`` (int64 (1,): 1 once the ratio vector froze, then ``mean_weight``/
  ``var_weight`` hold the one-hot ratios themselves instead of logits) and the SparsestMax
  ``radius`` (1,). A frozen vector becomes the index of its selected normalizer in our
  ``mean_fixed``/``var_fixed`` (-1 while free), with ``mean_fixed_at``/``var_fixed_at`` -1 (the
  iteration is not recorded in their files); ``radius`` becomes a 0-dim tensor.
- ``mmdet_resnet``: already named like the target (one's own checkpoints, see
  ``tools/register_pretrained.py``): every key passes through unchanged.

Group SN (``ratio_groups=G`` in the entry's ``norm_cfg``) from a checkpoint with one ratio vector per
layer: the per-group tensors (logits (K,), SSN's ``*_fixed``/``*_fixed_at`` (1,)) are repeated over
the G groups. The layer then computes exactly what the source layer computes, and finetuning lets
the groups move apart; the report lists these keys as expanded.

Norm ``sn/bn/gnK`` becomes ``{abbr}K`` of the target norm type (``sn``, ``gn``, ``bcn``); convs keep
their names (``WSConv`` has the parameters of ``nn.Conv2d``). ``fc`` is dropped (the backbone has
no classifier). The result is checked key by key and shape by shape against the target backbone
built from the manifest entry: nothing missing, nothing left over.
"""
import functools
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .errors import ConversionError
from .manifest import PretrainedEntry, checkpoint_dir, get_entry
from .store import converted_file_name, file_sha256, verify_source

RUNNING_STATS = ('keep', 'reset')
_STAT_RESET = {'running_mean': torch.zeros_like, 'running_var': torch.ones_like,
               'num_batches_tracked': torch.zeros_like}
# Convs and the norm modules of a torchvision-like ResNet; ``kind`` is the source norm name.
_CONV_KEY = re.compile(r'(?:layer\d+\.\d+\.)?(?:conv\d|downsample\.0)\.(?:weight|bias)')
_NORM_KEY = re.compile(r'(?P<block>layer\d+\.\d+\.)?(?:(?P<kind>[a-z]+)(?P<index>\d)|(?P<shortcut>downsample\.1))'
                       r'\.(?P<param>.+)')
_DROPPED = {re.compile(r'fc\.(?:weight|bias)'): 'ImageNet classifier: the backbone has no fc layer'}


def _same(t: Tensor) -> Tensor:
    return t


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


@dataclass(frozen=True)
class SourceLayout:
    """How one authors' codebase names and shapes a ResNet's norm layers.

    ``norm_names``: source names of norm modules (``bn`` in ``bn1``); ``params``: source parameter
    path inside a norm -> (target parameter name, reshape); ``added``: target parameters the source
    lacks, created with the given value when the target has them; ``prepare``: rewrites the whole
    source state dict first, for values that depend on other tensors of the same layer (its second
    argument names the entry in error messages).
    """
    name: str
    norm_names: Tuple[str, ...]
    params: Dict[str, Tuple[str, Callable[[Tensor], Tensor]]]
    added: Dict[str, Callable[[], Tensor]] = field(default_factory=dict)
    prepare: Optional[Callable[[Dict[str, Tensor], str], Dict[str, Tensor]]] = None


# The per-group tensors of (S)SN, repeated when a single-vector checkpoint fills a group SN.
_PER_GROUP = frozenset({'mean_weight', 'var_weight', 'mean_fixed', 'var_fixed', 'mean_fixed_at', 'var_fixed_at'})
# How close to 1 and 0 the authors' frozen ratio vectors must be: SparsestMax clamps to [0, 1], so the
# one-hot values are exact, but their sum is formed in float32.
_ONE_HOT_TOLERANCE = 1e-6


def _scalar(t: Tensor) -> Tensor:
    return t.reshape(())


def _ssn_frozen_choices(source: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
    """The authors' ``{mean,var}_fixed`` flags (0 free, 1 frozen) as our indices (-1 free, else the
    selected normalizer: the position of the 1 in their one-hot ``{mean,var}_weight``)."""
    prepared = dict(source)
    for key, flag in source.items():
        prefix, _, leaf = key.rpartition('.')
        if leaf not in ('mean_fixed', 'var_fixed'):
            continue
        ratios_key = f'{prefix}.{leaf[:-len("_fixed")]}_weight'
        if flag.numel() != 1 or int(flag) not in (0, 1):
            raise ConversionError(f'{name}: {key} is {flag.tolist()}; the SSN authors\' layer stores one flag, '
                                  '0 (free) or 1 (frozen). The file is not an SSN2d checkpoint.')
        if ratios_key not in source:
            raise ConversionError(f'{name}: {key} has no {ratios_key} beside it; the source is not an SSN2d '
                                  'checkpoint')
        if int(flag) == 0:
            prepared[key] = torch.full((1,), -1, dtype=torch.long)
            continue
        ratios = source[ratios_key].double()
        index = int(ratios.argmax())
        rest = float(ratios.sum() - ratios[index])
        if abs(float(ratios[index]) - 1) > _ONE_HOT_TOLERANCE or rest > _ONE_HOT_TOLERANCE or ratios.min() < 0:
            raise ConversionError(
                f'{name}: {key} is 1 (frozen), so {ratios_key} should hold one-hot ratios, but it holds '
                f'{ratios.tolist()}. The file is not a checkpoint of the authors\' SSN2d.')
        prepared[key] = torch.tensor([index], dtype=torch.long)
    return prepared


_BCN_PARAMS = {'weight': ('group_weight', _flat), 'bias': ('group_bias', _flat),
               **{f'{sub}.{p}': (p, _same) for sub in ('pbn', 'bn')
                  for p in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')}}

LAYOUTS: Dict[str, SourceLayout] = {
    'sn_resnet': SourceLayout(
        'sn_resnet', ('sn',),
        {'weight': ('weight', _flat), 'bias': ('bias', _flat), 'mean_weight': ('mean_weight', _same),
         'var_weight': ('var_weight', _same), 'running_mean': ('running_mean', _flat),
         'running_var': ('running_var', _flat)},
        # The authors' SN counts no batches; 0 is what a fresh layer holds.
        {'num_batches_tracked': lambda: torch.tensor(0, dtype=torch.long)}),
    'ssn_resnet': SourceLayout(
        'ssn_resnet', ('sn',),
        {'weight': ('weight', _flat), 'bias': ('bias', _flat), 'mean_weight': ('mean_weight', _same),
         'var_weight': ('var_weight', _same), 'running_mean': ('running_mean', _flat),
         'running_var': ('running_var', _flat), 'mean_fixed': ('mean_fixed', _same),
         'var_fixed': ('var_fixed', _same), 'radius': ('radius', _scalar)},
        # Their SSN2d counts no batches and does not record when a vector froze ("unknown": -1).
        {'num_batches_tracked': lambda: torch.tensor(0, dtype=torch.long),
         'mean_fixed_at': lambda: torch.full((1,), -1, dtype=torch.long),
         'var_fixed_at': lambda: torch.full((1,), -1, dtype=torch.long)},
        _ssn_frozen_choices),
    'gn_ws_resnet': SourceLayout(
        'gn_ws_resnet', ('bn', 'gn'), {'weight': ('weight', _same), 'bias': ('bias', _same)}),
    'bcn_ws_resnet': SourceLayout('bcn_ws_resnet', ('bn',), _BCN_PARAMS),
}
NATIVE_LAYOUT = 'mmdet_resnet'


@dataclass
class ConversionReport:
    """What a conversion did, key by key (source names after unwrapping)."""
    state_dict: Dict[str, Tensor]
    renamed: List[Tuple[str, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    added: List[str] = field(default_factory=list)
    reset: List[str] = field(default_factory=list)
    #: Per-group tensors repeated over the target's ratio groups (see the module docstring).
    expanded: List[str] = field(default_factory=list)
    #: Which published digest of the source file was verified (set by :func:`convert_checkpoint_file`).
    source_check: Optional[str] = None

    def summary(self) -> str:
        lines = [self.source_check] if self.source_check else []
        lines += [f'{len(self.state_dict)} tensors written; {sum(a != b for a, b in self.renamed)} renamed, '
                  f'{len(self.dropped)} dropped, {len(self.added)} added, {len(self.reset)} reset, '
                  f'{len(self.expanded)} expanded to ratio groups']
        lines += [f'  dropped {key}: {why}' for key, why in self.dropped]
        lines += [f'  added {key}' for key in self.added]
        lines += [f'  reset {key}' for key in self.reset]
        lines += [f'  expanded {key}' for key in self.expanded]
        return '\n'.join(lines)


def read_source_checkpoint(path, trust_pickle: bool = False) -> dict:
    """Load the authors' checkpoint file on CPU.

    ``torch.load(weights_only=True)`` is tried first. The authors' training scripts saved whole
    training states, which may hold Python objects that weights-only loading refuses; only with
    ``trust_pickle=True`` (a file from the URL recorded in the manifest) are they unpickled.
    """
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            reason = str(err).strip().splitlines()[0]
            raise ConversionError(
                f'{path} holds Python objects besides tensors, which torch.load(weights_only=True) '
                f'refuses ({reason}). Unpickling can run code: if the file comes from the URL recorded '
                'in the manifest and you trust it, pass --trust-pickle (trust_pickle=True).') from err
    return torch.load(path, map_location='cpu', weights_only=False)


def unwrap_state_dict(checkpoint: dict) -> Dict[str, Tensor]:
    """The tensors of a checkpoint: unwraps ``{'state_dict': ...}`` and strips ``module.``."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ConversionError('the checkpoint holds no state dict: expected a mapping of tensor names to '
                              "tensors, or one under 'state_dict'")
    others = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if others:
        raise ConversionError(f'the state dict holds non-tensor entries {others}; it is not a model state dict')
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def target_state_shapes(backbone_cfg: dict) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the state dict of the mmdet backbone ``backbone_cfg``.

    Built on the meta device, so nothing is allocated; memoized per config.
    """
    cfg = {k: v for k, v in backbone_cfg.items() if k not in ('init_cfg', 'pretrained')}
    return dict(_meta_state_shapes(json.dumps(cfg, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _meta_state_shapes(cfg_json: str) -> Tuple[Tuple[str, Tuple[Tuple[int, ...], torch.dtype]], ...]:
    from mmdet.registry import MODELS  # mmdet is imported only when a conversion needs it
    with torch.device('meta'):
        model = MODELS.build(json.loads(cfg_json))
    return tuple((k, (tuple(v.shape), v.dtype)) for k, v in model.state_dict().items())


def _norm_abbr(norm_cfg: dict) -> str:
    from mmcv.cnn.bricks.norm import infer_abbr
    from mmengine.registry import MODELS
    norm_class = MODELS.get(norm_cfg['type'])
    if norm_class is None:
        raise ConversionError(f"unknown norm type {norm_cfg['type']!r} in the manifest's Method.norm_cfg")
    return infer_abbr(norm_class)


def _map_key(key: str, layout: SourceLayout, abbr: str) -> Optional[Tuple[str, Callable[[Tensor], Tensor]]]:
    if _CONV_KEY.fullmatch(key):
        return key, _same
    match = _NORM_KEY.fullmatch(key)
    if match is None or (match['kind'] is not None and match['kind'] not in layout.norm_names):
        return None
    mapped = layout.params.get(match['param'])
    if mapped is None:
        return None
    module = 'downsample.1' if match['shortcut'] else f"{abbr}{match['index']}"
    return f"{match['block'] or ''}{module}.{mapped[0]}", mapped[1]


def convert_state_dict(source: Dict[str, Tensor], entry: PretrainedEntry, running_stats: str = 'keep',
                       target: Optional[Dict[str, Tuple[Tuple[int, ...], torch.dtype]]] = None
                       ) -> ConversionReport:
    """Map an unwrapped source state dict onto the backbone of ``entry``, strictly.

    Args:
        source: tensors by name, ``module.`` already stripped (see :func:`unwrap_state_dict`).
        entry: the manifest entry; its ``Source.Key Layout`` selects the mapping and its
            ``Method``/``Architecture`` the target backbone.
        running_stats: ``'keep'`` the source's running statistics (the BN statistics of the
            pretraining batch size), or ``'reset'`` them to a fresh layer's values (mean 0, var 1,
            0 batches) to re-estimate them on the target data, as the SN papers' batch average does.
        target: target names -> (shape, dtype); built from the entry when None.

    Raises:
        ConversionError: listing every source key that is neither mapped nor dropped, every target
            key left unfilled and every shape mismatch.
    """
    if running_stats not in RUNNING_STATS:
        raise ValueError(f'running_stats must be one of {RUNNING_STATS}, got {running_stats!r}')
    if target is None:
        target = target_state_shapes(entry.backbone_cfg())
    report = ConversionReport({})
    leftover = []
    if entry.key_layout == NATIVE_LAYOUT:
        for key, value in source.items():
            report.state_dict[key] = value
            report.renamed.append((key, key))
    elif entry.key_layout in LAYOUTS:
        layout = LAYOUTS[entry.key_layout]
        abbr = _norm_abbr(entry.norm_cfg)
        if layout.prepare is not None:
            source = layout.prepare(source, entry.name)
        for key, value in source.items():
            why = next((why for pattern, why in _DROPPED.items() if pattern.fullmatch(key)), None)
            if why is not None:
                report.dropped.append((key, why))
                continue
            mapped = _map_key(key, layout, abbr)
            if mapped is None:
                leftover.append(key)
                continue
            new_key, reshape = mapped
            if new_key in report.state_dict:
                raise ConversionError(f'{entry.name}: source keys {[k for k, n in report.renamed if n == new_key]}'
                                      f' and {key!r} both map to {new_key!r}; the source mixes two layouts')
            report.state_dict[new_key] = reshape(value)
            report.renamed.append((key, new_key))
        for key in target:
            param = key.rpartition('.')[2]
            if key not in report.state_dict and param in layout.added:
                report.state_dict[key] = layout.added[param]()
                report.added.append(key)
    else:
        raise ConversionError(f'{entry.name}: unknown Source.Key Layout {entry.key_layout!r}; known layouts: '
                              f'{sorted(LAYOUTS) + [NATIVE_LAYOUT]}')
    _expand_ratio_groups(report, target)
    _check_against_target(entry.name, report, leftover, target)
    if running_stats == 'reset':
        for key, value in report.state_dict.items():
            reset = _STAT_RESET.get(key.rpartition('.')[2])
            if reset is not None:
                report.state_dict[key] = reset(value)
                report.reset.append(key)
    return report


def _expand_ratio_groups(report: ConversionReport, target: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]) -> None:
    """Repeat single-group (S)SN tensors over the groups of a group-SN target: (K,) logits -> (G, K),
    (1,) SSN flags -> (G,). Other shape differences are left for the strict check to report."""
    for key, value in report.state_dict.items():
        if key.rpartition('.')[2] not in _PER_GROUP or key not in target:
            continue
        shape = target[key][0]
        # The single-group layout: logits (K,) where the group SN has (G, K); flags (1,) for (G,).
        single = shape[1:] if len(shape) == 2 else (1,)
        if len(shape) not in (1, 2) or shape[0] == 1 or tuple(value.shape) != single:
            continue
        report.state_dict[key] = value.reshape((1,) + shape[1:]).expand(shape).clone()
        report.expanded.append(key)


def _check_against_target(name: str, report: ConversionReport, leftover: List[str],
                          target: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]) -> None:
    unexpected = sorted(set(report.state_dict) - set(target))
    source_of = dict((new, old) for old, new in report.renamed)
    unexpected_text = [f'{source_of.get(k, k)} -> {k}' for k in unexpected]
    missing = sorted(set(target) - set(report.state_dict))
    wrong_shape = [f'{source_of.get(k, k)} -> {k}: {tuple(v.shape)} vs backbone {target[k][0]}'
                   for k, v in report.state_dict.items() if k in target and tuple(v.shape) != target[k][0]]
    wrong_kind = [f'{k}: {v.dtype} vs backbone {target[k][1]}' for k, v in report.state_dict.items()
                  if k in target and v.dtype.is_floating_point != target[k][1].is_floating_point]
    problems = []
    if leftover:
        problems.append(f'source keys neither mapped nor dropped: {sorted(leftover)}')
    if unexpected_text:
        problems.append(f'keys with no place in the backbone: {unexpected_text}')
    if missing:
        problems.append(f'backbone keys left unfilled: {missing}')
    if wrong_shape:
        problems.append(f'shape mismatches: {wrong_shape}')
    if wrong_kind:
        problems.append(f'dtype mismatches: {wrong_kind}')
    if problems:
        raise ConversionError(
            f'{name}: the source checkpoint does not fit the backbone of this manifest entry exactly:\n  '
            + '\n  '.join(problems)
            + "\nCheck that the file is the one the entry's Source.URLs point to (depth, norm type, "
              "'bn' in SN's normalizers, ratio_groups), or register it as a new entry with "
              "tools/register_pretrained.py.")
    for key, value in report.state_dict.items():
        if value.dtype != target[key][1]:
            report.state_dict[key] = value.to(target[key][1])


def save_converted(state_dict: Dict[str, Tensor], name: str, out_dir) -> Tuple[Path, str]:
    """Write a plain state dict as ``{name}-{sha256[:8]}.pth`` in ``out_dir``; returns (path, sha256)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f'.{name}.partial'
    torch.save({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, tmp)
    sha256 = file_sha256(tmp)
    path = out_dir / converted_file_name(name, sha256)
    tmp.replace(path)
    return path, sha256


def manifest_record(name: str, sha256: str) -> str:
    """The ``Converted`` block to paste into the entry ``name`` of its manifest."""
    return (f'# in the entry Name: {name}, and remove Converted.* from its Unknowns:\n'
            f'    Converted:\n      File: {converted_file_name(name, sha256)}\n      SHA256: {sha256}')


def convert_checkpoint_file(name: str, source, out_dir=None, running_stats: str = 'keep',
                            trust_pickle: bool = False) -> Tuple[Path, str, ConversionReport]:
    """Convert the authors' file ``source`` for manifest entry ``name`` into ``out_dir``.

    Checks the source against every digest the manifest records (``Source.SHA256``, full or a
    published prefix; ``Source.MD5``), converts strictly (see :func:`convert_state_dict`) and writes
    ``{name}-{sha256[:8]}.pth``, by default into the cache folder where ``norm_plugins://name`` looks.
    Returns (path, sha256, report); ``report.source_check`` says which digest was verified.
    """
    entry = get_entry(name)
    source = Path(source).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f'source checkpoint {source} does not exist; download it from '
                                f'{list(entry.source_urls)}')
    source_check = verify_source(entry, source)
    report = convert_state_dict(unwrap_state_dict(read_source_checkpoint(source, trust_pickle)), entry,
                                running_stats)
    report.source_check = source_check
    path, sha256 = save_converted(report.state_dict, entry.name, checkpoint_dir() if out_dir is None else out_dir)
    return path, sha256, report
