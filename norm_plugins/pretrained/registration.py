"""Registering one's own pretrained backbone (e.g. an SN ResNet pretrained at a new batch size).

The checkpoint must already be named like the mmdet/mmseg ``ResNet`` it was trained as (layout
``mmdet_resnet``); it is checked key by key against that backbone, copied into the cache as a plain
state dict named ``{name}-{sha256[:8]}.pth``, and described by a new manifest entry, by default in
``$NORM_PLUGINS_HOME/manifests/local.yml``.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from .conversion import NATIVE_LAYOUT, convert_state_dict, read_source_checkpoint, save_converted, unwrap_state_dict
from .errors import ConversionError, ManifestError, UnknownPretrainedError
from .manifest import PretrainedEntry, checkpoint_dir, get_entry, user_manifest_dir, validate_entry
from .store import converted_file_name, file_sha256


def _plain(value: Any) -> Any:
    """Config values as YAML-safe builtins (tuples and ConfigDicts become lists and dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _new_entry(name: str, depth: int, norm_cfg: Dict[str, Any], conv_cfg: Optional[Dict[str, Any]], gpus: int,
               images_per_gpu: int, epochs: Optional[int], top1: Optional[float], top5: Optional[float],
               dataset: str, source: Path, source_sha256: str, notes: Optional[str]) -> Dict[str, Any]:
    unknowns = {'Weights': 'a local checkpoint registered with tools/register_pretrained.py; no public URL'}
    if epochs is None:
        unknowns['Metadata.Epochs'] = 'not given when the checkpoint was registered'
    metrics = {}
    if top1 is not None:
        metrics['Top 1 Accuracy'] = top1
    if top5 is not None:
        metrics['Top 5 Accuracy'] = top5
    results = [{'Task': 'Image Classification', 'Dataset': dataset, 'Metrics': metrics}] if metrics else []
    entry = {
        'Name': name,
        'In Collection': 'Registered',
        'Metadata': {'Training Data': dataset, 'GPUs': gpus, 'Images Per GPU': images_per_gpu,
                     'Batch Size': gpus * images_per_gpu, 'Epochs': epochs},
        'Method': {'norm_cfg': _plain(norm_cfg), 'conv_cfg': _plain(conv_cfg)},
        'Architecture': {'type': 'ResNet', 'depth': depth, 'deep_stem': False, 'style': 'pytorch'},
        'Results': results,
        'Weights': None,
        'Source': {'URLs': [], 'File': source.name, 'SHA256': source_sha256, 'Key Layout': NATIVE_LAYOUT},
        'Converted': {'File': None, 'SHA256': None},
        'Unknowns': unknowns,
    }
    if notes:
        entry['Notes'] = notes
    return entry


def register_checkpoint(checkpoint, name: str, depth: int, norm_cfg: Dict[str, Any], gpus: int,
                        images_per_gpu: int, conv_cfg: Optional[Dict[str, Any]] = None,
                        epochs: Optional[int] = None, top1: Optional[float] = None, top5: Optional[float] = None,
                        dataset: str = 'ImageNet-1k', prefix: str = '', manifest=None, notes: Optional[str] = None,
                        trust_pickle: bool = False) -> Tuple[Dict[str, Any], Path]:
    """Add ``checkpoint`` as manifest entry ``name``; returns (entry, converted file path).

    Args:
        checkpoint: a state dict file (``module.`` prefix and ``state_dict`` wrapper allowed).
        prefix: keep only the keys under this prefix, stripped (``'backbone.'`` for a whole
            classifier's checkpoint).
        manifest: YAML file to add the entry to; default ``$NORM_PLUGINS_HOME/manifests/local.yml``.
        Others: the facts recorded in the entry; ``gpus`` and ``images_per_gpu`` drive the batch check.
    """
    try:
        existing = get_entry(name)
    except UnknownPretrainedError:
        existing = None
    if existing is not None:
        raise ManifestError(f'a pretrained entry named {name!r} already exists in {existing.manifest}; '
                            'choose another name')
    source = Path(checkpoint).expanduser()
    state = unwrap_state_dict(read_source_checkpoint(source, trust_pickle))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ConversionError(f'{source} has no keys under the prefix {prefix!r}')
    raw = _new_entry(name, depth, norm_cfg, conv_cfg, gpus, images_per_gpu, epochs, top1, top5, dataset, source,
                     file_sha256(source), notes)
    manifest = Path(manifest).expanduser() if manifest else user_manifest_dir() / 'local.yml'
    # Validate the finished entry before writing anything.
    validate_entry({**raw, 'Converted': {'File': 'x.pth', 'SHA256': '0' * 64}}, str(manifest))
    report = convert_state_dict(state, PretrainedEntry(name, raw, manifest))
    path, sha256 = save_converted(report.state_dict, name, checkpoint_dir())
    raw['Converted'] = {'File': converted_file_name(name, sha256), 'SHA256': sha256}
    data = {}
    if manifest.is_file():
        with open(manifest, encoding='utf-8') as f:
            data = yaml.safe_load(f) or {}
    data.setdefault('Collections', [{'Name': 'Registered', 'Metadata': {'Training Data': dataset}}])
    data.setdefault('Models', []).append(raw)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, 'w', encoding='utf-8') as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
    return raw, path
