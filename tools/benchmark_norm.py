"""Forward+backward time and extra memory of norm_plugins layers against PyTorch's own.

    python tools/benchmark_norm.py                       # CPU, float32 and bfloat16, all layers
    python tools/benchmark_norm.py --device cuda         # GPU: true peak memory from the allocator
    python tools/benchmark_norm.py --layers SN GN --shapes 2x64x400x672 --dtypes float32

Time is the median over ``--repeats`` runs of ``layer(x).backward(grad)`` after ``--warmup`` runs.
Memory, as a multiple of the input's size:
- cuda: peak allocated during forward+backward beyond what existed before it (input and upstream
  gradient), minus the input gradient every layer must produce. cuDNN BatchNorm scores 1 (its output).
- cpu: PyTorch has no CPU allocator statistics, so the figure is what the layer keeps alive for
  backward (saved tensors), the part that grows with network depth.
Parameters stay float32 for half-precision inputs, as under AMP.
"""
import argparse
import statistics
import time
from typing import Callable, Dict

import torch
from torch import nn

from norm_plugins import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d

DEFAULT_SHAPES = ('2x256x200x336', '2x64x400x672', '16x256x56x56')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# name -> factory(channels) building the layer under test; extend here for new layers.
LAYERS: Dict[str, Callable[[int], nn.Module]] = {
    'BN': nn.BatchNorm2d,
    'GN': lambda c: nn.GroupNorm(32, c),
    'SN': SwitchableNorm,
    'SyncSN': SyncSwitchableNorm,
    'BCN': BatchChannelNorm,
    'BCN-micro': lambda c: BatchChannelNorm(c, estimate=True),
    # 3x3 C->C convolutions: Weight Standardization's cost is measured against the plain conv.
    'Conv3x3': lambda c: nn.Conv2d(c, c, 3, padding=1, bias=False),
    'WSConv3x3': lambda c: WSConv2d(c, c, 3, padding=1, bias=False),
    'WSConv3x3-folded': lambda c: WSConv2d(c, c, 3, padding=1, bias=False).fold(),
}
# Each row is also reported relative to these, when they are among the layers measured.
BASELINES = ('BN', 'GN', 'Conv3x3')


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(d) for d in text.lower().split('x'))
    except ValueError:
        shape = ()
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f'shape {text!r} must look like NxCxHxW, e.g. 2x256x200x336')
    return shape


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, warmup: int,
                 repeats: int) -> float:
    """Median milliseconds of one forward+backward."""
    times = []
    for i in range(warmup + repeats):
        x.grad = None
        _sync(x.device)
        start = time.perf_counter()
        layer(x).backward(grad)
        _sync(x.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def extra_memory(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Extra memory as a multiple of the input's bytes (see the module docstring)."""
    x.grad = None
    input_bytes = x.numel() * x.element_size()
    if x.device.type == 'cuda':
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        layer(x).backward(grad)
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - before - input_bytes
        return peak / input_bytes
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        y = layer(x)
    y.backward(grad)
    return sum(saved) / input_bytes


def benchmark(layer_names, shapes, dtypes, device: torch.device, warmup: int, repeats: int):
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
            grad = torch.randn(shape, generator=gen, device=device).to(dtype)
            for name in layer_names:
                layer = LAYERS[name](shape[1]).to(device).train()
                try:
                    ms = time_fwd_bwd(layer, x, grad, warmup, repeats)
                    mem = extra_memory(layer, x, grad)
                except RuntimeError as err:  # e.g. an op without a kernel for this dtype/device
                    ms, mem = float('nan'), float('nan')
                    print(f'# {name} {shape} {dtype_name}: {err}'.splitlines()[0])
                rows.append(dict(layer=name, shape='x'.join(map(str, shape)), dtype=dtype_name,
                                 ms=ms, memory=mem))
                del layer
            del x, grad
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    return rows


def markdown(rows) -> str:
    header = ['layer', 'shape', 'dtype', 'fwd+bwd ms']
    header += [f'x {b}' for b in BASELINES] + ['extra memory (x input)']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    by_key = {(r['layer'], r['shape'], r['dtype']): r['ms'] for r in rows}
    for r in rows:
        ratios = []
        for base in BASELINES:
            ref = by_key.get((base, r['shape'], r['dtype']))
            ratios.append('-' if ref is None else f"{r['ms'] / ref:.2f}")
        lines.append(f"| {r['layer']} | {r['shape']} | {r['dtype']} | {r['ms']:.2f} | "
                     + ' | '.join(ratios) + f" | {r['memory']:.2f} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:index]')
    parser.add_argument('--layers', nargs='+', default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument('--shapes', nargs='+', type=parse_shape,
                        default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'], choices=list(DTYPES))
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s)')
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was requested but torch sees no GPU; run on a GPU machine or '
                     'drop --device')
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU, {torch.get_num_threads()} threads'
    print(f'# torch {torch.__version__}, {where}')
    rows = benchmark(args.layers, args.shapes, args.dtypes, device, args.warmup, args.repeats)
    print(markdown(rows))
    return rows


if __name__ == '__main__':
    main()
