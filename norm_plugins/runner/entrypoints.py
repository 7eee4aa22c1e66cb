"""``tools/train.py`` and ``tools/test.py``: one pair of scripts for mmdet and mmseg configs.

The toolbox comes from the config's ``default_scope``; mmengine imports its registries lazily, and
the config's ``custom_imports`` loads norm_plugins. Flags follow mmdet/mmseg's own tools.
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Callable, List, Optional

import torch
from mmengine.config import DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint_safety import mmengine_checkpoint_globals
from .config_setup import (apply_train_flags, check_checkpoint, check_dataset, check_pretrained_backbones,
                           default_work_dir, load_config)
from .cpu_distributed import init_cpu_process_group
from .errors import ToolError
from .layer_summary import describe_layers

LAUNCHERS = ['none', 'pytorch', 'slurm', 'mpi']


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: ./work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. train_cfg.max_iters=100 '
                             'train_dataloader.batch_size=4 (lists: key="[a,b]")')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Train an mmdet or mmsegmentation model (norm_plugins layers '
                                                 'available in every config).')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (CUDA only)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or without a value from the latest checkpoint '
                             'in the work dir')
    _common_flags(parser)
    return parser


def test_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Evaluate an mmdet or mmsegmentation checkpoint on the '
                                                 "config's test set.")
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file (.pth written by tools/train.py)')
    parser.add_argument('--metrics-json', help='also write the metrics, checkpoint and log path to this JSON file')
    _common_flags(parser)
    return parser


def _setup_launcher(cfg, launcher: str) -> None:
    if launcher != 'none' and not torch.cuda.is_available():
        init_cpu_process_group(launcher, cfg)


def build_runner(cfg) -> Runner:
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.logger.info(describe_layers(runner.model))
    return runner


def _add_rng_state_hook(cfg) -> None:
    """Every run saves torch's random state in its checkpoints, so that ``--resume`` continues exactly."""
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') != 'TorchRNGStateHook']
    cfg.custom_hooks = hooks + [dict(type='TorchRNGStateHook')]


def train(argv: Optional[List[str]] = None) -> Runner:
    args = train_parser().parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = load_config(args.config, args.cfg_options)
    apply_train_flags(cfg, args.config, args.work_dir, args.amp, args.resume, args.launcher)
    check_dataset(cfg, ('train', 'val'))
    batch_check = check_pretrained_backbones(cfg)
    _add_rng_state_hook(cfg)
    _setup_launcher(cfg, args.launcher)
    runner = build_runner(cfg)
    for line in batch_check:
        runner.logger.info(line)
    with mmengine_checkpoint_globals():
        runner.train()
    return runner


def test(argv: Optional[List[str]] = None) -> dict:
    args = test_parser().parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    check_checkpoint(args.checkpoint, 'checkpoint argument',
                     'pass a .pth file written by tools/train.py, e.g. work_dirs/<config name>/iter_<N>.pth')
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or default_work_dir(args.config)
    cfg.load_from = args.checkpoint
    check_dataset(cfg, ('test',))
    _setup_launcher(cfg, args.launcher)
    runner = build_runner(cfg)
    with mmengine_checkpoint_globals():
        metrics = runner.test()
    if args.metrics_json and runner.rank == 0:
        with open(args.metrics_json, 'w') as f:
            json.dump(dict(metrics={k: float(v) for k, v in metrics.items()}, checkpoint=args.checkpoint,
                           log=osp.join(runner.log_dir, f'{runner.timestamp}.log')), f, indent=2)
    return metrics


def run_tool(main: Callable[[Optional[List[str]]], object]) -> None:
    """Run a tool's main; input errors end the process with one line on stderr, exit status 2."""
    try:
        main(None)
    except ToolError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
