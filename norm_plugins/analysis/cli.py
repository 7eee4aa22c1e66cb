"""The analysis tools: ``tools/precise_stats.py``, ``tools/analysis/sn_ratios.py`` and
``tools/analysis/plot_sn_ratio_dynamics.py``."""
import argparse
import copy
import os
import os.path as osp
from typing import List, Optional

import torch
from mmengine.config import DictAction
from mmengine.dist import get_dist_info, init_dist
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from ..runner.config_setup import check_checkpoint, check_dataset, load_config
from ..runner.cpu_distributed import init_cpu_process_group
from ..runner.errors import ToolError
from .model_io import build_model, read_checkpoint
from .plots import plot_divergence, plot_freezing, plot_layer_ratios, plot_ratio_dynamics
from .precise_stats import FORWARD_MODES, recompute_batch_stats
from .ratio_logs import read_ratio_series
from .ratios import collect_ratios, compare_ratios, frozen_summary, mean_divergence, ratio_table


def precise_stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Batch-average statistics (SN paper Sec. 3): recompute the BN part '
                                            'of SN/SyncSN and large-batch BCN as the average over K training '
                                            'batches with the network frozen, and write a new checkpoint. Layers '
                                            'the model keeps in eval while training (frozen_stages, norm_eval) '
                                            'keep their statistics.')
    p.add_argument('config', help='the training config (its train_dataloader supplies the batches)')
    p.add_argument('checkpoint', help='trained checkpoint (.pth)')
    p.add_argument('--num-batches', type=int, default=200, help='K, training batches per process (default 200)')
    p.add_argument('--out', help='new checkpoint (default: <checkpoint>_precise.pth)')
    p.add_argument('--mode', choices=FORWARD_MODES, default='loss',
                   help="forward mode: 'loss' sees batches exactly as training does (default)")
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                   help='job launcher; every process averages its own batches, then the averages are averaged')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    return p


def precise_stats_main(argv: Optional[List[str]] = None) -> str:
    args = precise_stats_parser().parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if args.num_batches < 1:
        raise ToolError(f'--num-batches must be at least 1, got {args.num_batches}')
    cfg = load_config(args.config, args.cfg_options)
    check_checkpoint(args.checkpoint, 'checkpoint argument', 'pass the .pth file written by tools/train.py')
    check_dataset(cfg, ('train',))
    if args.launcher != 'none':
        if torch.cuda.is_available():
            init_dist(args.launcher)
        else:
            init_cpu_process_group(args.launcher, cfg)
    init_default_scope(cfg.default_scope)
    model = build_model(cfg, args.checkpoint)
    # Training mode as the model defines it: frozen stages and norm_eval layers stay in eval and
    # keep their statistics.
    model.train()
    if torch.cuda.is_available():
        model = model.cuda()
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    loader_cfg['persistent_workers'] = False
    loader = Runner.build_dataloader(loader_cfg, seed=cfg.get('randomness', {}).get('seed'))
    try:
        count = recompute_batch_stats(model, loader, args.num_batches, args.mode)
    except ValueError as error:
        raise ToolError(str(error)) from None
    rank, world_size = get_dist_info()
    out = args.out or f'{osp.splitext(args.checkpoint)[0]}_precise.pth'
    if rank == 0:
        meta = dict(read_checkpoint(args.checkpoint).get('meta') or {})
        meta['precise_stats'] = dict(num_batches=args.num_batches, world_size=world_size, mode=args.mode,
                                     source=args.checkpoint, layers=count)
        torch.save({'meta': meta, 'state_dict': {k: v.cpu() for k, v in model.state_dict().items()}}, out)
        print(f'batch-average statistics of {count} layers over {args.num_batches} batches x {world_size} '
              f'process(es) written to {out}')
    return out


def sn_ratios_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Per-layer SN importance ratios of a checkpoint: a table (mean and '
                                            'variance ratios, hard choice, D(mean||var); SSN: radius and the '
                                            'iteration each vector froze) and stacked IN/LN/BN bar figures grouped '
                                            'by backbone stage, neck and heads (PNG and SVG), plus for SSN a figure '
                                            'of when each layer froze and to which normalizer. Group-SN layers '
                                            'give one row per channel group.')
    p.add_argument('checkpoint', help='checkpoint with SN layers')
    p.add_argument('--config', help='its config: layers then say which normalizers they use (needed for subsets '
                                    'other than IN/LN/BN and IN/LN)')
    p.add_argument('--compare', metavar='OTHER', help='a second checkpoint of the same architecture: plot the '
                                                      'per-layer divergence of their ratios (the papers\' Fig. 5)')
    p.add_argument('--out-dir', default='sn_ratios', help='where figures and the table go (default ./sn_ratios)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    return p


def _collect(checkpoint: str, config: Optional[str], cfg_options):
    try:
        return collect_ratios(checkpoint, config, cfg_options)
    except (FileNotFoundError, ValueError) as error:
        raise ToolError(str(error)) from None


def sn_ratios_main(argv: Optional[List[str]] = None) -> List[str]:
    args = sn_ratios_parser().parse_args(argv)
    layers = _collect(args.checkpoint, args.config, args.cfg_options)
    os.makedirs(args.out_dir, exist_ok=True)
    name = osp.splitext(osp.basename(args.checkpoint))[0]
    table = ratio_table(layers)
    print(table)
    table_path = osp.join(args.out_dir, f'{name}_ratios.txt')
    with open(table_path, 'w') as f:
        f.write(table + '\n')
    written = [table_path] + plot_layer_ratios(layers, osp.join(args.out_dir, f'{name}_ratios'),
                                               title=f'SN ratios of {name} ({len(layers)} layers)')
    frozen = frozen_summary(layers)
    if frozen:
        print(frozen)
        with open(table_path, 'a') as f:
            f.write(frozen + '\n')
        written += plot_freezing(layers, osp.join(args.out_dir, f'{name}_frozen'),
                                 title=f'SSN ratio vectors of {name}: iteration frozen')
    if args.compare:
        other = _collect(args.compare, args.config, args.cfg_options)
        other_name = osp.splitext(osp.basename(args.compare))[0]
        try:
            rows = compare_ratios(layers, other)
        except ValueError as error:
            raise ToolError(str(error)) from None
        d_mean, d_var = mean_divergence(rows)
        print(f'\n{len(rows)} common layers; average D(mean ratios) {d_mean:.4f}, D(variance ratios) {d_var:.4f}')
        written += plot_divergence(rows, osp.join(args.out_dir, f'{name}_vs_{other_name}_divergence'),
                                   title=f'{name} vs {other_name}')
    print('written: ' + ', '.join(written))
    return written


def ratio_dynamics_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Plot the per-stage SN ratios that SNRatioLoggerHook logged during '
                                            'training against the iteration (PNG and SVG).')
    p.add_argument('log', help='a work dir (its newest */vis_data/scalars.json is read) or a scalars.json file')
    p.add_argument('--out', default='sn_ratio_dynamics', help='output path without extension')
    return p


def ratio_dynamics_main(argv: Optional[List[str]] = None) -> List[str]:
    args = ratio_dynamics_parser().parse_args(argv)
    try:
        series = read_ratio_series(args.log)
    except (FileNotFoundError, ValueError) as error:
        raise ToolError(str(error)) from None
    written = plot_ratio_dynamics(series, args.out)
    print('written: ' + ', '.join(written))
    return written
