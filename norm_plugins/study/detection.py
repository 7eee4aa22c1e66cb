"""Task 2 of the batch-size study: Faster R-CNN from scratch on the shapes demo data.

The SN TPAMI paper's Table 4 (lower part) trains detectors from scratch in its setting-1 (Faster
R-CNN without FPN, 4 GPUs x 3 images, Sec. 4.2), where BN's statistics come from 3 images. Here
each run is the demo config
``configs/demo/faster-rcnn_r18-syncsn_fpn_2xb4-600i_shapes-128.py`` (ResNet-18 of base width 32, FPN,
4conv1fc box head) with the normalizer's ``norm_cfg``/``conv_cfg`` in the backbone, neck and box
head, ``images_per_process`` images per step, random initialization and a schedule of ``iters``
iterations. It is built and trained by the project's tool helpers (config loading, train flags,
dataset checks, Runner), then evaluated with COCO box mAP on the validation images. Runs are
independent single-process trainings, ``workers`` of them at a time, each logging to its work dir.
"""
import json
import os
import os.path as osp
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch
import torch.multiprocessing as mp

from .classification import SSN_LOGIT_LR_MULT, SSN_LOGIT_MAX_NORM, mean_sn_ratios, ssn_freezing
from .normalizers import layer_cfgs

DEMO_CONFIG = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'configs', 'demo',
                       'faster-rcnn_r18-syncsn_fpn_2xb4-600i_shapes-128.py')
#: Normalizers a single-process detector can use (SyncSN needs several processes: in one it is SN).
DETECTION_CHOICES = ('BN', 'GN', 'GN+WS', 'SN', 'SN-G2', 'SSN', 'BCN+WS')


@dataclass(frozen=True)
class DetectionSetting:
    """What one detection study trains; see :mod:`norm_plugins.study.settings` for presets."""
    normalizers: Tuple[str, ...]
    seeds: Tuple[int, ...]
    iters: int
    data_root: str
    images_per_process: int = 2
    num_groups: int = 8
    workers: int = 2
    device: str = 'cpu'
    config: str = DEMO_CONFIG

    def check(self) -> None:
        unknown = [n for n in self.normalizers if n not in DETECTION_CHOICES]
        if unknown:
            raise ValueError(f'detection normalizer(s) {", ".join(unknown)} not supported; choose from '
                             f'{", ".join(DETECTION_CHOICES)}')
        if self.iters < 1 or self.images_per_process < 1 or self.workers < 1:
            raise ValueError('detection iters, images per process and workers must be >= 1')
        if not osp.isfile(self.config):
            raise ValueError(f'detection config not found: {self.config}; run from a norm_plugins checkout '
                             'or pass --detection-config')


def build_config(setting: DetectionSetting, normalizer: str, seed: int, work_dir: str):
    """The demo config with ``normalizer`` everywhere it has norms, from scratch, at ``images_per_process``."""
    from ..runner.config_setup import apply_train_flags, check_dataset, load_config
    cfg = load_config(setting.config)
    layers = layer_cfgs(normalizer, setting.num_groups)
    model = cfg.model
    for part in (model.backbone, model.neck, model.roi_head.bbox_head):
        part.norm_cfg = layers['norm_cfg']
        part.conv_cfg = layers['conv_cfg']
    model.backbone.init_cfg = None
    # The root of the data, the batch and the length of training; nothing else of the demo changes.
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = setting.data_root
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.val_evaluator.ann_file = osp.join(setting.data_root, 'annotations', 'instances_val.json')
    cfg.test_evaluator = cfg.val_evaluator
    cfg.train_dataloader.batch_size = setting.images_per_process
    cfg.train_cfg.max_iters = setting.iters
    cfg.train_cfg.val_interval = setting.iters + 1
    warmup = max(1, setting.iters // 12)
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=setting.iters, eta_min_ratio=0.01),
    ]
    if layers['norm_cfg']['type'] == 'BCN':
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='BCNUpdateRateHook')]
    if layers['norm_cfg']['type'] == 'SSN':  # the SSN recipes' radius schedule and logit training
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='SSNRadiusHook')]
        cfg.optim_wrapper.paramwise_cfg.update(mixture_lr_mult=SSN_LOGIT_LR_MULT,
                                               mixture_clip_grad=dict(max_norm=SSN_LOGIT_MAX_NORM))
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=setting.iters + 1)
    cfg.default_hooks.logger.interval = max(1, min(50, setting.iters // 4))
    cfg.randomness = dict(seed=seed)
    if setting.device == 'cpu':
        cfg.env_cfg = dict(cfg.get('env_cfg', {}), cudnn_benchmark=False)
    apply_train_flags(cfg, setting.config, work_dir, False, None, 'none')
    check_dataset(cfg, ('train', 'val'))
    return cfg


def train_one(setting: DetectionSetting, normalizer: str, seed: int, work_dir: str) -> Dict:
    """Train one detector and return its COCO box metrics (run in a worker process)."""
    from ..runner.checkpoint_safety import mmengine_checkpoint_globals
    from ..runner.entrypoints import build_runner
    os.makedirs(work_dir, exist_ok=True)
    # Each run logs to its own file rather than interleaving with the other workers.
    log = open(osp.join(work_dir, 'run.log'), 'w')
    os.dup2(log.fileno(), sys.stdout.fileno())
    os.dup2(log.fileno(), sys.stderr.fileno())
    torch.set_num_threads(1)
    cfg = build_config(setting, normalizer, seed, work_dir)
    start = time.perf_counter()
    runner = build_runner(cfg)
    with mmengine_checkpoint_globals():
        runner.train()
        seconds = time.perf_counter() - start
        metrics = runner.val()
    # The trained detector's SN ratios and SSN choices, as for the classifiers.
    return dict(task='detection', normalizer=normalizer, images_per_process=setting.images_per_process,
                processes=1, seed=seed, steps=setting.iters, images=setting.iters * setting.images_per_process,
                bbox_mAP=round(100 * float(metrics['coco/bbox_mAP']), 2),
                bbox_mAP_50=round(100 * float(metrics['coco/bbox_mAP_50']), 2),
                train_seconds=round(seconds, 2), work_dir=work_dir,
                **mean_sn_ratios(runner.model), **ssn_freezing(runner.model))


def _run(args) -> Dict:
    setting_dict, normalizer, seed, work_dir = args
    return train_one(DetectionSetting(**setting_dict), normalizer, seed, work_dir)


def run_detection(setting: DetectionSetting, out_dir: str, results_path: str) -> List[Dict]:
    """Train every (normalizer, seed) detector, ``setting.workers`` at a time; one JSON line per run."""
    setting.check()
    open(results_path, 'w').close()
    runs = [(asdict(setting), n, s, osp.join(out_dir, f'detection_{n.replace("+", "-")}_seed{s}'))
            for n in setting.normalizers for s in setting.seeds]
    results = []
    # Fresh processes (spawn, one task each): mmengine keeps global state per process.
    with mp.get_context('spawn').Pool(min(setting.workers, len(runs)), maxtasksperchild=1) as pool:
        for k, result in enumerate(pool.imap(_run, runs), 1):
            results.append(result)
            with open(results_path, 'a') as f:
                f.write(json.dumps(result) + '\n')
            print(f'[detection {k}/{len(runs)}] {result["normalizer"]} seed {result["seed"]}: bbox mAP '
                  f'{result["bbox_mAP"]:.1f} (AP50 {result["bbox_mAP_50"]:.1f}, {result["train_seconds"]:.0f} s)',
                  flush=True)
    return results
