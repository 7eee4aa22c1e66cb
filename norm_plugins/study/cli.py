"""``tools/study_batch_size.py``: the batch-size study from the command line.

    python tools/study_batch_size.py                      # default: 2 CPU processes, ~20 min idle
    python tools/study_batch_size.py --device cuda        # larger study on one GPU
    python tools/study_batch_size.py --tiny               # seconds: checks the pipeline end to end

Writes into ``--out``: ``classification_runs.csv``/``detection_runs.csv`` (one row per run),
``summary.csv`` (mean, std and count over seeds), ``results.md``, ``accuracy_vs_batch.png`` and
``sn_ratios_vs_batch.png``.
"""
import argparse
import dataclasses
import os
import shlex
import sys
import time
from typing import List, Optional

import torch

from ..demo.shapes import generate_shapes_dataset, shapes_dataset_ready
from .classification import run_classification
from .detection import DETECTION_CHOICES, run_detection
from .normalizers import NORMALIZERS, check_normalizers
from .report import write_report
from .settings import preset

TASKS = ('classification', 'detection')


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
    return values


def _names(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(',') if v.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='Train the same small networks with BN, GN, GN+WS, SN, SyncSN, group SN (SN-G2), sparse SN '
                    '(SSN) and BCN+WS at several images per process (digits classification) and detectors from '
                    'scratch at 2 images per process (shapes demo data); write CSV/Markdown tables and plots, '
                    "with SN's ratios and how many SSN ratio vectors froze to which normalizer.")
    p.add_argument('--out', default='work_dirs/batch_size_study', help='output folder')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                   help='cpu: the default study (2 processes); cuda: the larger GPU study')
    p.add_argument('--tiny', action='store_true', help='a tiny study of a few seconds (pipeline check)')
    p.add_argument('--tasks', type=_names, default=TASKS, help='comma-separated subset of classification,detection')
    p.add_argument('--normalizers', type=_names, help=f'classification normalizers (default {",".join(NORMALIZERS)})')
    p.add_argument('--images-per-process', type=_ints, help='classification batch sizes per process, e.g. 1,2,8,32')
    p.add_argument('--seeds', type=_ints, help='classification seeds, e.g. 0,1,2')
    p.add_argument('--images', type=int, help='classification: images seen by every run (all processes together)')
    p.add_argument('--processes', type=int, help='classification: processes joined over gloo (default 2)')
    p.add_argument('--detection-normalizers', type=_names,
                   help=f'detection normalizers among {",".join(DETECTION_CHOICES)} (default BN,GN,SN)')
    p.add_argument('--detection-seeds', type=_ints, help='detection seeds')
    p.add_argument('--detection-iters', type=int, help='detection training iterations per run')
    p.add_argument('--detection-workers', type=int, help='detection runs trained at the same time')
    p.add_argument('--data-root', default='data/shapes',
                   help='shapes dataset folder (generated there when missing; not used with --tiny)')
    return p


def _override(setting, **changes):
    return dataclasses.replace(setting, **{k: v for k, v in changes.items() if v is not None})


def main(argv: Optional[List[str]] = None) -> dict:
    args = parser().parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        raise SystemExit(f'error: --tasks takes a comma-separated subset of {",".join(TASKS)}, got {",".join(args.tasks)}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda needs a CUDA GPU visible to torch; run without --device '
                         'for the CPU study')
    if args.tiny and args.device == 'cuda':
        raise SystemExit('error: --tiny is a CPU pipeline check; drop --device cuda')
    name = 'tiny' if args.tiny else ('cuda' if args.device == 'cuda' else 'default')
    os.makedirs(args.out, exist_ok=True)
    chosen = preset(name, args.out, args.data_root)
    try:
        classification = _override(
            chosen['classification'],
            normalizers=args.normalizers and check_normalizers(args.normalizers),
            images_per_process=args.images_per_process, seeds=args.seeds, images=args.images,
            processes=args.processes)
        detection = _override(
            chosen['detection'],
            normalizers=args.detection_normalizers and check_normalizers(args.detection_normalizers,
                                                                         DETECTION_CHOICES),
            seeds=args.detection_seeds, iters=args.detection_iters, workers=args.detection_workers)
        classification.check()
        detection.check()
    except ValueError as error:
        raise SystemExit(f'error: {error}') from None
    command = 'python tools/study_batch_size.py ' + ' '.join(shlex.quote(a) for a in
                                                              (sys.argv[1:] if argv is None else argv))
    rows = []
    start = time.perf_counter()
    if 'classification' in args.tasks:
        rows += run_classification(classification, os.path.join(args.out, 'classification_runs.jsonl'))
    if 'detection' in args.tasks:
        if not shapes_dataset_ready(detection.data_root, **chosen['shapes']):
            print(f'generating the shapes dataset in {detection.data_root}', flush=True)
            generate_shapes_dataset(detection.data_root, **chosen['shapes'])
        rows += run_detection(detection, args.out, os.path.join(args.out, 'detection_runs.jsonl'))
    minutes = (time.perf_counter() - start) / 60
    settings = {'preset': name, 'wall time (min)': f'{minutes:.1f}'}
    if 'classification' in args.tasks:
        settings['classification'] = _describe(classification)
    if 'detection' in args.tasks:
        settings['detection'] = _describe(detection)
    paths = write_report(rows, args.out, command.strip(), settings)
    print(f'batch-size study done in {minutes:.1f} min: ' + ', '.join(paths.values()), flush=True)
    return paths


def _describe(setting) -> str:
    skip = {'config', 'data_root'}
    return ', '.join(f'{k}={v}' for k, v in dataclasses.asdict(setting).items() if k not in skip)
