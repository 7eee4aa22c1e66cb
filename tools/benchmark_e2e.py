"""Whole-model training-iteration time and memory of each norm, built from the recipe configs.

    python tools/benchmark_e2e.py --device cuda                      # full sizes, every model and norm
    python tools/benchmark_e2e.py --device cuda --models mask_rcnn --norms GN SN --iters 20
    python tools/benchmark_e2e.py --small                            # CPU-sized (CI): small images

One iteration is what a Runner's ``train_step`` does: forward to the losses, backward, optimizer step
(the recipe's optimizer wrapper, paramwise settings included), on one synthetic batch built once, so
no dataset is needed. Data preprocessing (normalize, pad) runs once, outside the timing.

Models, with each norm everywhere its recipe puts it:
- ``mask_rcnn``: Mask R-CNN R50-FPN, 2 images of 800x1344 with 8 boxes and masks each (``--small``:
  128x128, and 32 sampled RoIs per image instead of 512, as the demo config).
  Norms in backbone, FPN, 4conv1fc box head and mask head; 'BN' is mmdet's default, the upstream
  config: frozen BN (``norm_eval``, first stage frozen) in the backbone only, 2fc box head.
- ``deeplabv3``: DeepLabV3 R50-D8, 2 crops of 769x769, Cityscapes' 19 classes (``--small``: 65x65).
  Norms in backbone, ASPP decode head and auxiliary FCN head; 'BN' is mmseg's default, the upstream
  config: SyncBN everywhere, which a single process runs as BN (as mmengine's Runner reverts it).
  GN is the GN+WS recipe with plain convolutions: there is no GN-only segmentation recipe.

Norms: BN (above), GN(32), GN+WS, SN, SyncSN and BCN+WS. There is no process group, so SyncSN runs
at world size 1, as on one GPU: its synchronization is a no-op. Pretrained initialization is off.

Reported per model and norm, with ratios to GN side by side:
- the median iteration time over ``--iters`` iterations after ``--warmup`` (CUDA synchronized);
- cuda: peak allocated memory during the timed iterations (weights, gradients, optimizer state and
  activations), ``torch.cuda.max_memory_allocated``;
- cpu: PyTorch keeps no CPU allocator statistics, so the figure is what one forward saves for
  backward, counting each storage once: activations, and the weights the convolutions keep (new
  tensors under WS, which standardizes them).
"""
import argparse
import contextlib
import gc
import importlib
import math
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from mmengine.config import Config
from mmengine.hub import get_config
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

import norm_plugins  # noqa: F401  (registers SN, SyncSN, BCN and WSConv)

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
NORMS = ('BN', 'GN', 'GN+WS', 'SN', 'SyncSN', 'BCN+WS')
BASELINE = 'GN'
# model -> scope, images per iteration, full and --small input size, config per norm
MODELS = {
    'mask_rcnn': dict(
        scope='mmdet', batch=2, size=(800, 1344), small=(128, 128),
        configs={
            'BN': 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
            'GN': 'mask_rcnn/mask-rcnn_r50_fpn_gn-all_8xb2-1x_coco.py',
            'GN+WS': 'mask_rcnn/mask-rcnn_r50_fpn_gn-ws-all_8xb2-1x_coco.py',
            'SN': 'mask_rcnn/mask-rcnn_r50_fpn_sn-all_8xb2-1x_coco.py',
            'SyncSN': 'mask_rcnn/mask-rcnn_r50_fpn_syncsn-all_8xb2-1x_coco.py',
            'BCN+WS': 'mask_rcnn/mask-rcnn_r50_fpn_bcn-ws-all_8xb2-1x_coco.py',
        }),
    'deeplabv3': dict(
        scope='mmseg', batch=2, size=(769, 769), small=(65, 65),
        configs={
            'BN': 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-769x769.py',
            # No GN-only segmentation recipe: the GN+WS one with plain convolutions.
            'GN': ('deeplabv3/deeplabv3_r50-d8_gn-ws-all_8xb2-80k_cityscapes-769x769.py',
                   {f'model.{part}.conv_cfg': None for part in ('backbone', 'decode_head', 'auxiliary_head')}),
            'GN+WS': 'deeplabv3/deeplabv3_r50-d8_gn-ws-all_8xb2-80k_cityscapes-769x769.py',
            'SN': 'deeplabv3/deeplabv3_r50-d8_sn-all_8xb2-80k_cityscapes-769x769.py',
            'SyncSN': 'deeplabv3/deeplabv3_r50-d8_syncsn-all_8xb2-80k_cityscapes-769x769.py',
            'BCN+WS': 'deeplabv3/deeplabv3_r50-d8_bcn-ws-all_8xb2-80k_cityscapes-769x769.py',
        }),
}
# --small: the RoI heads on 512 sampled RoIs per image cost seconds on a CPU whatever the image
# size; sample as the demo config does.
SMALL_DETECTION_SAMPLING = {'model.train_cfg.rpn_proposal.max_per_img': 300,
                            'model.train_cfg.rcnn.sampler.num': 32}
INSTANCES_PER_IMAGE = 8
NUM_THING_CLASSES = 80


def load_config(model: str, norm: str, size: tuple, small: bool) -> Config:
    """The recipe of ``norm`` for ``model``, with pretrained initialization off."""
    entry = MODELS[model]['configs'][norm]
    name, overrides = entry if isinstance(entry, tuple) else (entry, {})
    cfg = get_config(name) if '::' in name else Config.fromfile(str(CONFIGS / name))
    cfg.merge_from_dict(overrides)
    cfg.model.backbone.init_cfg = None
    if small and MODELS[model]['scope'] == 'mmdet':
        cfg.merge_from_dict(SMALL_DETECTION_SAMPLING)
    if MODELS[model]['scope'] == 'mmseg':
        cfg.model.pretrained = None
        # The recipes pad every image to the crop size; pad to the benchmark's instead.
        cfg.model.data_preprocessor.size = size
    return cfg


def build(cfg: Config, scope: str, device: torch.device):
    """Model (initialized as a Runner would, in train mode) and the recipe's optimizer wrapper."""
    with DefaultScope.overwrite_default_scope(scope):
        registry = importlib.import_module(f'{scope}.registry').MODELS
        model = registry.build(cfg.model)
        model.init_weights()
        # What mmengine's Runner does outside distributed training (mmseg's default SyncBN, the
        # recipes' ASPP pooling branch).
        model = revert_sync_batchnorm(model).to(device).train()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    return model, optim_wrapper


def detection_batch(batch: int, size: tuple, rng: np.random.Generator) -> dict:
    """Noise images with INSTANCES_PER_IMAGE rectangular objects each: boxes, labels, bitmap masks."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    h, w = size
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
        corner = rng.uniform(0, 0.7, (INSTANCES_PER_IMAGE, 2)) * (w, h)
        extent = rng.uniform(0.1, 0.3, (INSTANCES_PER_IMAGE, 2)) * (w, h)
        boxes = np.concatenate([corner, corner + extent], axis=1).round()
        masks = np.zeros((INSTANCES_PER_IMAGE, h, w), dtype=np.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
            mask[y1:y2, x1:x2] = 1
        sample = DetDataSample(metainfo=dict(img_shape=size, ori_shape=size, scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.from_numpy(boxes).float(),
            labels=torch.from_numpy(rng.integers(0, NUM_THING_CLASSES, INSTANCES_PER_IMAGE)),
            masks=BitmapMasks(masks, h, w))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def segmentation_batch(batch: int, size: tuple, rng: np.random.Generator, num_classes: int) -> dict:
    """Noise images with random per-pixel labels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, *size), dtype=np.uint8)))
        sample = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size))
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(rng.integers(0, num_classes, (1, *size))))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def synthetic_batch(model_name: str, cfg: Config, size: tuple) -> dict:
    rng = np.random.default_rng(0)
    batch = MODELS[model_name]['batch']
    if MODELS[model_name]['scope'] == 'mmdet':
        return detection_batch(batch, size, rng)
    return segmentation_batch(batch, size, rng, cfg.model.decode_head.num_classes)


def train_step(model, optim_wrapper, data: dict, saved: Optional[dict] = None) -> None:
    """Forward to the losses, backward and optimizer step: a Runner's train_step. ``saved``, when
    given, receives the bytes of every distinct storage the forward keeps for backward."""
    def record(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = contextlib.nullcontext() if saved is None else \
        torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor)
    with hooks:
        losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    optim_wrapper.update_params(loss)


def input_label(model_name: str, size: tuple) -> str:
    return f"{MODELS[model_name]['batch']}x{size[0]}x{size[1]}"


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(model_name: str, norm: str, device: torch.device, small: bool, iters: int,
            warmup: int) -> dict:
    """Median iteration milliseconds and memory bytes (see the module docstring) of one model."""
    torch.manual_seed(0)
    size = MODELS[model_name]['small' if small else 'size']
    cfg = load_config(model_name, norm, size, small)
    model, optim_wrapper = build(cfg, MODELS[model_name]['scope'], device)
    data = model.data_preprocessor(synthetic_batch(model_name, cfg, size), True)
    # cpu: the first iteration (a warmup one unless --warmup 0) also records what the forward saves
    # for backward; the hooks cost microseconds per tensor.
    saved = {} if device.type == 'cpu' else None
    times = []
    for i in range(warmup + iters):
        if i == warmup and device.type == 'cuda':
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        train_step(model, optim_wrapper, data, saved if i == 0 else None)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    memory = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else sum(saved.values())
    return dict(model=model_name, norm=norm, input=input_label(model_name, size),
                ms=statistics.median(times), memory=memory)


def benchmark(model_names, norms, device: torch.device, small: bool, iters: int, warmup: int):
    rows = []
    for model_name in model_names:
        for norm in norms:
            try:
                rows.append(measure(model_name, norm, device, small, iters, warmup))
                print(f"# {model_name} {norm}: {rows[-1]['ms']:.1f} ms", flush=True)
            except torch.cuda.OutOfMemoryError as err:
                print(f'# {model_name} {norm}: {err}'.splitlines()[0])
                size = MODELS[model_name]['small' if small else 'size']
                rows.append(dict(model=model_name, norm=norm, input=input_label(model_name, size),
                                 ms=math.nan, memory=math.nan))
            gc.collect()
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    return rows


def markdown(rows, device: torch.device) -> str:
    memory = 'peak memory GiB' if device.type == 'cuda' else 'saved for backward GiB'
    header = ['model', 'input', 'norm', 'iteration ms', f'x {BASELINE}', memory, f'x {BASELINE}']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    baseline = {r['model']: r for r in rows if r['norm'] == BASELINE}
    for r in rows:
        base = baseline.get(r['model'])
        ratios = ['-', '-'] if base is None else [f"{r['ms'] / base['ms']:.2f}",
                                                  f"{r['memory'] / base['memory']:.2f}"]
        lines.append(f"| {r['model']} | {r['input']} | {r['norm']} | {r['ms']:.1f} | {ratios[0]} | "
                     f"{r['memory'] / 2 ** 30:.3f} | {ratios[1]} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu or cuda[:index] (default: cuda when available)')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--norms', nargs='+', default=list(NORMS), choices=list(NORMS))
    parser.add_argument('--small', action='store_true',
                        help='small images (detection 2x128x128 with 32 RoIs per image, segmentation 2x65x65), '
                        'same architectures: a CPU-sized run; default --iters 2 --warmup 1')
    parser.add_argument('--iters', type=int, default=None, help='timed iterations (default 10, --small 2)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed first iterations (default 3, --small 1)')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s)')
    args = parser.parse_args(argv)
    iters = args.iters if args.iters is not None else (2 if args.small else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    if iters < 1 or warmup < 0:
        parser.error(f'--iters must be >= 1 and --warmup >= 0, got {iters} and {warmup}')

    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was requested but torch sees no GPU; run on a GPU machine or '
                     'use --device cpu (with --small)')
    if args.threads:
        torch.set_num_threads(args.threads)
    # The builders' current logger: keeps their per-parameter lines (frozen stages) out of the report.
    MMLogger.get_instance('benchmark_e2e', log_level='ERROR')
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU, {torch.get_num_threads()} threads'
    print(f'# torch {torch.__version__}, {where}; {iters} timed iterations after {warmup}')
    rows = benchmark(args.models, args.norms, device, args.small, iters, warmup)
    print(markdown(rows, device))
    return rows


if __name__ == '__main__':
    main()
