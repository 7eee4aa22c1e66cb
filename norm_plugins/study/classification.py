"""Task 1 of the batch-size study: a small ConvNet on scikit-learn's handwritten digits.

The digits (1797 images of 8x8 pixels, bundled with scikit-learn: no download) are upsampled
bilinearly to ``image_size`` and split once into fixed train and test sets. Every run trains the same
network (``ConvModule`` stages built from the normalizer's ``norm_cfg``/``conv_cfg``) in
``processes`` processes joined by a process group (gloo), each process holding ``images_per_process``
images per step, like the papers' (#GPUs, images per GPU) settings. All runs of a study see the
same number of images in the same order (a function of the seed only), with SGD whose learning rate
follows the linear scaling rule (``base_lr`` per 64 images of global batch), a short linear warmup
and a cosine decay; the micro-batch BCN update rate is set to the learning rate at every step
(the WS/BCN paper's choice). SSN trains as the SSN code trains it: the SparsestMax radius follows
:class:`~norm_plugins.hooks.SSNRadiusHook`'s schedule of the progress (one-hot, hence frozen, from
82% of the steps on), and its ratio logits learn at a tenth of the learning rate without weight
decay, their gradients clipped together to norm 1. Evaluation is on the test set in eval mode
(running/estimated statistics), one process.
"""
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..hooks.ssn_radius_hook import SSNRadiusHook
from ..layers import BatchChannelNorm, SwitchableNorm
from ..layers.sparse_switchable_norm import SparseSwitchableNorm, refresh_frozen
from ..ops.sparsestmax import vertex_distance
from ..testing import run_distributed
from .normalizers import layer_cfgs

NUM_CLASSES = 10
#: Images per test split; the rest of the 1797 digits train.
TEST_IMAGES = 447
#: The learning rate is ``base_lr * global_batch / LR_REFERENCE_BATCH``.
LR_REFERENCE_BATCH = 64
WARMUP_FRACTION = 0.05
#: SSN's ratio logits in the SSN code: a tenth of the learning rate, gradients clipped to norm 1.
SSN_LOGIT_LR_MULT, SSN_LOGIT_MAX_NORM = 0.1, 1.0


@dataclass(frozen=True)
class ClassificationSetting:
    """What one classification study trains; see :mod:`norm_plugins.study.settings` for presets."""
    normalizers: Tuple[str, ...]
    images_per_process: Tuple[int, ...]
    seeds: Tuple[int, ...]
    images: int
    processes: int = 2
    image_size: int = 16
    widths: Tuple[int, ...] = (16, 32, 64)
    num_groups: int = 8
    base_lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    device: str = 'cpu'
    threads_per_process: int = 1

    def check(self) -> None:
        for b in self.images_per_process:
            if b < 1:
                raise ValueError(f'images per process must be >= 1, got {b}')
        largest = max(self.images_per_process) * self.processes
        if self.images < largest:
            raise ValueError(f'--images {self.images} is smaller than one step of the largest global batch '
                             f'({largest}); raise it or drop the largest batch size')
        for w in self.widths:
            if w % self.num_groups:
                raise ValueError(f'width {w} is not divisible by num_groups={self.num_groups} (GN and BCN need it)')
        if self.processes < 1:
            raise ValueError(f'processes must be >= 1, got {self.processes}')
        if self.base_lr * max(self.images_per_process) * self.processes / LR_REFERENCE_BATCH > 1:
            raise ValueError('the largest learning rate exceeds 1, which BCN cannot use as its update rate; '
                             'lower --base-lr')


class DigitsNet(nn.Module):
    """Stages of two 3x3 ``ConvModule``s (the first of each stage after the first has stride 2),
    global average pooling and a linear classifier."""

    def __init__(self, widths: Sequence[int], norm_cfg: dict, conv_cfg: Optional[dict]):
        super().__init__()
        layers = []
        in_channels = 1
        for stage, width in enumerate(widths):
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(ConvModule(in_channels, width, 3, stride=stride, padding=1, conv_cfg=conv_cfg,
                                         norm_cfg=norm_cfg, act_cfg=dict(type='ReLU')))
                in_channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def load_digits(image_size: int) -> Dict[str, Tensor]:
    """Train/test tensors: images (N, 1, S, S) standardized with the train set's mean and std."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode='bilinear', align_corners=False)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # A fixed split, independent of the study's seeds.
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    test, train = order[:TEST_IMAGES], order[TEST_IMAGES:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return dict(train_x=images[train], train_y=labels[train], test_x=images[test], test_y=labels[test])


def image_order(seed: int, num_train: int, count: int) -> np.ndarray:
    """The first ``count`` training indices of a sequence of shuffled epochs (a function of the seed)."""
    rng = np.random.default_rng(seed)
    epochs = math.ceil(count / num_train)
    return np.concatenate([rng.permutation(num_train) for _ in range(epochs)])[:count]


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def mean_sn_ratios(model: nn.Module) -> Dict[str, float]:
    """SN's importance ratios (softmax; SparsestMax for SSN) averaged over all SN-family layers, a
    group-SN layer's groups averaged first (empty without SN)."""
    layers = [m for m in model.modules() if isinstance(m, SwitchableNorm)]
    if not layers:
        return {}
    out = {}
    for kind in ('mean', 'var'):
        for name in ('in', 'ln', 'bn'):
            out[f'sn_{kind}_{name}'] = float(np.mean([float(m.ratios()[kind][name].mean()) for m in layers]))
    return out


def ssn_freezing(model: nn.Module) -> Dict[str, float]:
    """SSN layers: how many ratio vectors there are (layers x channel groups) and how many of the mean
    and variance vectors froze to each normalizer, plus the final radius (empty without SSN)."""
    layers = [m for m in model.modules() if isinstance(m, SparseSwitchableNorm)]
    if not layers:
        return {}
    out = {'ssn_vectors': sum(layer.ratio_groups for layer in layers), 'ssn_radius': float(layers[0].radius)}
    for kind in ('mean', 'var'):
        chosen = [layer.normalizers[i] for layer in layers for i in getattr(layer, f'{kind}_fixed').tolist() if i >= 0]
        for name in ('in', 'ln', 'bn'):
            out[f'ssn_frozen_{kind}_{name}'] = chosen.count(name)
    return out


def _data_parallel(model: nn.Module) -> DistributedDataParallel:
    """DDP that leaves buffers per process: BN statistics stay local, SyncSN and BCN reduce their own.

    Every rank builds the model from the same seed, so buffers are equal at the start either way;
    torch >= 2.13 renames ``broadcast_buffers`` to ``forward_sync_buffers``.
    """
    if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


def _param_groups(model: nn.Module, ssn_layers: Sequence[SparseSwitchableNorm]) -> List[Dict]:
    """One group of every parameter, except SSN's ratio logits: a group of their own at a tenth of
    the learning rate (``lr_mult``) without weight decay (the SSN code)."""
    logits = [p for layer in ssn_layers for p in (layer.mean_weight, layer.var_weight) if p is not None]
    chosen = {id(p) for p in logits}
    groups = [dict(params=[p for p in model.parameters() if id(p) not in chosen])]
    if logits:
        groups.append(dict(params=logits, lr_mult=SSN_LOGIT_LR_MULT, weight_decay=0.0))
    return groups


def train_one(setting: ClassificationSetting, data: Dict[str, Tensor], normalizer: str, batch: int, seed: int,
              rank: int, world: int) -> Dict:
    """Train and evaluate one (normalizer, images per process, seed) run; every rank calls it."""
    device = torch.device(setting.device)
    torch.manual_seed(seed)
    model = DigitsNet(setting.widths, **layer_cfgs(normalizer, setting.num_groups)).to(device)
    micro_bcn = [m for m in model.modules() if isinstance(m, BatchChannelNorm) and m.estimate]
    ssn_layers = [m for m in model.modules() if isinstance(m, SparseSwitchableNorm)]
    radius_schedule = SSNRadiusHook()
    net = _data_parallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(_param_groups(model, ssn_layers), lr=0.0, momentum=setting.momentum,
                                weight_decay=setting.weight_decay)
    ssn_logits = [p for group in optimizer.param_groups if 'lr_mult' in group for p in group['params']]
    global_batch = batch * world
    steps = setting.images // global_batch
    peak_lr = setting.base_lr * global_batch / LR_REFERENCE_BATCH
    order = torch.from_numpy(image_order(seed, len(data['train_y']), steps * global_batch))
    train_x, train_y = data['train_x'].to(device), data['train_y'].to(device)
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        lr = learning_rate(step, steps, peak_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_mult', 1.0)
        for layer in micro_bcn:
            layer.set_update_rate(lr)
        fraction = radius_schedule.radius_fraction(step / steps)
        for layer in ssn_layers:
            layer.set_radius(fraction * vertex_distance(len(layer.normalizers)), iteration=step)
        first = step * global_batch + rank * batch
        index = order[first:first + batch].to(device)
        loss = F.cross_entropy(net(train_x[index]), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ssn_logits:  # after DDP's all-reduce: every rank clips the same gradients
            torch.nn.utils.clip_grad_norm_(ssn_logits, SSN_LOGIT_MAX_NORM)
        optimizer.step()
        losses.append(loss.detach())
    if ssn_layers:  # the host copy of the frozen state, so eval computes only the chosen statistics
        refresh_frozen(ssn_layers)
    tail = torch.stack(losses[-max(1, steps // 10):]).mean().reshape(1).cpu()
    if world > 1:
        dist.all_reduce(tail)
        tail /= world
    seconds = time.perf_counter() - start
    result = dict(task='classification', normalizer=normalizer, images_per_process=batch, processes=world,
                  seed=seed, steps=steps, images=steps * global_batch, peak_lr=peak_lr,
                  final_train_loss=float(tail), train_seconds=round(seconds, 2))
    if rank == 0:
        result['accuracy'] = evaluate(model, data['test_x'].to(device), data['test_y'].to(device))
        result.update(mean_sn_ratios(model))
        result.update(ssn_freezing(model))
    return result


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, chunk: int = 512) -> float:
    """Top-1 accuracy in percent, eval mode (the statistics the model would be deployed with)."""
    model.eval()
    correct = sum(int((model(images[i:i + chunk]).argmax(1) == labels[i:i + chunk]).sum())
                  for i in range(0, len(labels), chunk))
    model.train()
    return round(100.0 * correct / len(labels), 4)


def plan(setting: ClassificationSetting) -> List[Tuple[str, int, int]]:
    """Every (normalizer, images per process, seed) run, seeds innermost."""
    return [(n, b, s) for n in setting.normalizers for b in setting.images_per_process for s in setting.seeds]


def _worker(rank: int, world: int, setting_dict: dict, results_path: str) -> None:
    setting = ClassificationSetting(**setting_dict)
    torch.set_num_threads(setting.threads_per_process)
    data = load_digits(setting.image_size)
    runs = plan(setting)
    for k, (normalizer, batch, seed) in enumerate(runs, 1):
        result = train_one(setting, data, normalizer, batch, seed, rank, world)
        if rank == 0:
            with open(results_path, 'a') as f:
                f.write(json.dumps(result) + '\n')
            print(f'[classification {k}/{len(runs)}] {normalizer} {batch} img/process seed {seed}: '
                  f'accuracy {result["accuracy"]:.2f}%, final train loss {result["final_train_loss"]:.3f} '
                  f'({result["train_seconds"]:.1f} s)', flush=True)


def run_classification(setting: ClassificationSetting, results_path: str) -> List[Dict]:
    """Run every run of ``setting`` (appending one JSON line per run to ``results_path``) and return them."""
    setting.check()
    open(results_path, 'w').close()
    args = (asdict(setting), results_path)
    if setting.processes > 1:
        run_distributed(_worker, setting.processes, *args)
    else:
        _worker(0, 1, *args)
    with open(results_path) as f:
        return [json.loads(line) for line in f if line.strip()]
