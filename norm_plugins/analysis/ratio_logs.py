"""The per-group ratio scalars :class:`~norm_plugins.hooks.SNRatioLoggerHook` logs, and reading them
back from a work dir."""
import glob
import json
import os.path as osp
from typing import Dict, List, Tuple

from torch import nn

from .ratios import group_means, ratios_from_model

Series = Dict[str, Dict[str, Dict[str, List[Tuple[int, float]]]]]
SCALAR_PREFIX = 'sn_ratios'


def ratio_scalars(model: nn.Module) -> Dict[str, float]:
    """``{'sn_ratios/<group>/<mean|var>/<in|ln|bn>': average ratio}`` over the SN layers of each group."""
    scalars = {}
    for group, ratios in group_means(ratios_from_model(model)).items():
        for which, values in ratios.items():
            for normalizer, value in zip(('in', 'ln', 'bn'), values.tolist()):
                scalars[f'{SCALAR_PREFIX}/{group}/{which}/{normalizer}'] = value
    return scalars


def find_scalars_file(path: str) -> str:
    """``path`` itself if it is a file, else the newest ``*/vis_data/scalars.json`` under the work dir."""
    if osp.isfile(path):
        return path
    if not osp.isdir(path):
        raise FileNotFoundError(f'{path} is neither a scalars.json file nor a work dir')
    found = sorted(glob.glob(osp.join(path, '*', 'vis_data', 'scalars.json')) +
                   glob.glob(osp.join(path, 'vis_data', 'scalars.json')), key=osp.getmtime)
    if not found:
        raise FileNotFoundError(f'no vis_data/scalars.json under {path}; train with LocalVisBackend in '
                                "visualizer.vis_backends (mmdet/mmseg's default) and custom_hooks="
                                "[dict(type='SNRatioLoggerHook')]")
    return found[-1]


def read_ratio_series(path: str) -> Series:
    """``series[group][mean|var][normalizer] = [(iteration, ratio), ...]`` from a scalars.json."""
    series: Series = {}
    with open(find_scalars_file(path)) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            step = record.get('step')
            for key, value in record.items():
                parts = key.split('/')
                if parts[0] != SCALAR_PREFIX or len(parts) != 4:
                    continue
                _, group, which, normalizer = parts
                series.setdefault(group, {}).setdefault(which, {}).setdefault(normalizer, []).append(
                    (int(step), float(value)))
    if not series:
        raise ValueError(f'{path} holds no {SCALAR_PREFIX}/ scalars; add custom_hooks=[dict(type='
                         "'SNRatioLoggerHook')] to the training config")
    return series
