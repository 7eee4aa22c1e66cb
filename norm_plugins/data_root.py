"""Fail-fast check that a config's datasets are on disk.

Without it a training run on a machine without the data builds the model, loads the pretrained
backbone and only then dies inside a dataset's ``load_data_list`` with a bare ``FileNotFoundError``;
and a missing validation set surfaces only after the first training epoch. ``check_data_root``
looks at the paths the datasets and evaluators will open before anything is built.
"""
import os
import os.path as osp
from typing import Iterator, List, Mapping, Sequence, Tuple

PHASES = ('train', 'val', 'test')


class DataRootNotFoundError(FileNotFoundError):
    """Files or folders a config's datasets or evaluators read are missing."""


def check_data_root(cfg: Mapping, phases: Sequence[str] = ('train', 'val')) -> None:
    """Raise :class:`DataRootNotFoundError` if a path that the config's datasets read is missing.

    Checks, for each phase, ``{phase}_dataloader.dataset`` (through dataset wrappers'
    ``dataset``/``datasets``): ``data_root`` joined with ``ann_file`` and with every
    ``data_prefix`` entry, the way mmengine's ``BaseDataset`` resolves them; and
    ``{phase}_evaluator`` ``ann_file`` (COCO metrics read ground truth from it). The val phase is
    skipped when ``val_cfg`` is None (no validation during training). Remote paths (``s3://...``)
    are left to their storage backend.

    Args:
        cfg: an mmengine ``Config`` (after ``--cfg-options`` are merged) or a plain dict.
        phases: which of ``('train', 'val', 'test')`` to check; training needs train and val.

    Raises:
        DataRootNotFoundError: names each missing path, where in the config it comes from, and
            the ``--cfg-options`` that point the config elsewhere.
        ValueError: on an unknown phase.
    """
    unknown = [phase for phase in phases if phase not in PHASES]
    if unknown:
        raise ValueError(f'check_data_root: unknown phases {unknown}; choose from {PHASES}')
    missing = []
    for phase in phases:
        if phase == 'val' and cfg.get('val_cfg') is None:
            continue
        loader = cfg.get(f'{phase}_dataloader')
        if loader:
            missing += _missing(_dataset_paths(loader.get('dataset'), f'{phase}_dataloader.dataset'))
        missing += _missing(_evaluator_paths(cfg.get(f'{phase}_evaluator'), f'{phase}_evaluator'))
    if missing:
        raise DataRootNotFoundError(_message(cfg, missing))


def _dataset_paths(dataset, key: str) -> Iterator[Tuple[str, str, str, str]]:
    """Yield (config key, dataset type, data_root, path) for every path a dataset config reads."""
    if not isinstance(dataset, Mapping):
        return
    if isinstance(dataset.get('dataset'), Mapping):
        yield from _dataset_paths(dataset['dataset'], f'{key}.dataset')
    if isinstance(dataset.get('datasets'), (list, tuple)):
        for index, child in enumerate(dataset['datasets']):
            yield from _dataset_paths(child, f'{key}.datasets.{index}')
    data_root = dataset.get('data_root') or ''
    kind = str(dataset.get('type', 'dataset'))
    relative = [dataset.get('ann_file')]
    prefix = dataset.get('data_prefix')
    if isinstance(prefix, Mapping):
        relative += list(prefix.values())
    for path in relative:
        if isinstance(path, str) and path:
            yield key, kind, data_root, osp.join(data_root, path)


def _evaluator_paths(evaluator, key: str) -> Iterator[Tuple[str, str, str, str]]:
    if isinstance(evaluator, (list, tuple)):
        for index, metric in enumerate(evaluator):
            yield from _evaluator_paths(metric, f'{key}.{index}')
    elif isinstance(evaluator, Mapping) and isinstance(evaluator.get('ann_file'), str):
        yield key, str(evaluator.get('type', 'evaluator')), '', evaluator['ann_file']


def _missing(found: Iterator[Tuple[str, str, str, str]]) -> List[Tuple[str, str, str, str]]:
    return [item for item in found if '://' not in item[3] and not osp.exists(item[3])]


def _message(cfg: Mapping, missing: List[Tuple[str, str, str, str]]) -> str:
    source = getattr(cfg, 'filename', None) or 'the config'
    lines = [f'Dataset files for {source} are missing (relative paths are resolved from the '
             f'working directory {os.getcwd()}):']
    lines += [f'  {path}  ({kind}, {key})' for key, kind, _, path in missing]
    roots = sorted({data_root for _, _, data_root, _ in missing if data_root})
    options = []
    for key, _, data_root, path in missing:
        if data_root:
            option = f'{key}.data_root={_placeholder(data_root)}'
        else:
            # An evaluator's ann_file usually lies under a dataset's data_root: keep the part below it.
            root = next((r for r in roots if path.startswith(r)), None)
            option = (f'{key}.ann_file={_placeholder(root)}{path[len(root):].lstrip("/")}' if root
                      else f'{key}.ann_file=/path/to/{osp.basename(path)}')
        if option not in options:
            options.append(option)
    link = ''
    if roots:
        target = roots[0].rstrip('/' + osp.sep)
        mkdir = f'mkdir -p {osp.dirname(target)} && ' if osp.dirname(target) else ''
        link = f' (e.g. `{mkdir}ln -s {_placeholder(target).rstrip("/")} {target}`)'
    lines.append(f'Fix: put the data there{link}, or point the config elsewhere:')
    lines.append('  --cfg-options ' + ' '.join(options))
    lines.append('(or set these keys in a config that inherits this one).')
    return '\n'.join(lines)


def _placeholder(data_root: str) -> str:
    """'/path/to/NAME/' for a data_root ending in folder NAME."""
    name = osp.basename(data_root.rstrip('/' + osp.sep)) or 'data'
    return f'/path/to/{name}/'
