"""Forward+backward time and extra memory of norm_plugins layers against PyTorch's own.

    python tools/benchmark_norm.py                       # CPU, float32 and bfloat16, all layers
    python tools/benchmark_norm.py --device cuda         # GPU: true peak memory from the allocator
    python tools/benchmark_norm.py --layers SN GN --shapes 2x64x400x672 --dtypes float32
    python tools/benchmark_norm.py --device cuda --backend triton torch   # kernels vs torch path
    TRITON_INTERPRET=1 python tools/benchmark_norm.py --count        # kernel launches, no timing

``--backend`` sets ``NORM_PLUGINS_BACKEND`` for each measurement of a norm_plugins layer, so the
Triton kernels and the torch path appear side by side (``triton`` on the CPU runs Triton's
interpreter and needs ``TRITON_INTERPRET=1``: a correctness check, not a speed figure). Layers from
elsewhere do not depend on it and are measured once. ``SN-plain`` is Switchable Normalization written in plain
autograd from the paper's Eq. 2-5, as users run it today.

Time is the median over ``--repeats`` runs of ``layer(x).backward(grad)`` after ``--warmup`` runs.
Memory, as a multiple of the input's size:
- cuda: peak allocated during forward+backward beyond what existed before it (input and upstream
  gradient), minus the input gradient every layer must produce. cuDNN BatchNorm scores 1 (its output).
- cpu: PyTorch has no CPU allocator statistics, so the figure is what the layer keeps alive for
  backward (saved tensors), the part that grows with network depth.
Norm parameters stay float32 for half-precision inputs, as under AMP; convolutions take the input's
dtype, as autocast casts them.

``--count`` times nothing: it counts the kernel launches of one training forward and one backward
per layer and backend at ``--shapes`` (default 2x256x13x21, an FPN level of a small image) with a
dispatch mode (:mod:`norm_plugins.ops.launch_count`): ATen ops that launch kernels plus Triton
launches (``triton``: through the interpreter on the CPU), and host-device synchronizations. The
torch path is counted as CUDA tensors take it (the CPU-only BatchNorm-kernel route of
:mod:`norm_plugins.ops.rowwise` is off). Parameter gradients start empty, as in a training step.
"""
import argparse
import contextlib
import os
import statistics
import time
from typing import Callable, Dict
from unittest import mock

import torch
from torch import nn

from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d
from norm_plugins.ops import rowwise
from norm_plugins.ops.backend import BACKENDS, ENV_VAR
from norm_plugins.ops.launch_count import count_launches

DEFAULT_SHAPES = ('2x256x200x336', '2x64x400x672', '16x256x56x56')
COUNT_SHAPE = '2x256x13x21'
COUNT_LAYERS = ('BN', 'GN', 'SN', 'SyncSN', 'BCN', 'BCN-micro')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}



class PlainSwitchableNorm(nn.Module):
    """Switchable Normalization as the SN paper writes it, in plain autograd (training mode).

    Eq. 2: instance moments mu_in, var_in over (H, W); Eq. 4: layer and batch moments from them,
    mu_ln = mean_c mu_in, var_ln = mean_c (var_in + mu_in^2) - mu_ln^2 (likewise over n for BN);
    Eq. 5: ratios w = softmax(lambda), w' = softmax(lambda'); Eq. 3:
    y = gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) + beta. Running BN statistics
    are updated as in training. Autograd keeps every intermediate of x's size for backward.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        h = x.reshape(n, c, -1)
        mean_in = h.mean(-1, keepdim=True)
        var_in = (h - mean_in).square().mean(-1, keepdim=True)
        second_in = var_in + mean_in.square()
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second_in.mean(1, keepdim=True) - mean_ln.square()
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = second_in.mean(0, keepdim=True) - mean_bn.square()
        with torch.no_grad():
            self.running_mean.lerp_(mean_bn.flatten().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var_bn.flatten().to(self.running_var.dtype), self.momentum)
        w = self.mean_weight.softmax(0)
        w_var = self.var_weight.softmax(0)
        mean = w[0] * mean_in + w[1] * mean_ln + w[2] * mean_bn
        var = w_var[0] * var_in + w_var[1] * var_ln + w_var[2] * var_bn
        h = (h - mean) / (var + self.eps).sqrt()
        return h.reshape(x.shape) * self.weight.view(1, c, *[1] * (x.dim() - 2)) \
            + self.bias.view(1, c, *[1] * (x.dim() - 2))


# name -> factory(channels) building the layer under test; extend here for new layers.
LAYERS: Dict[str, Callable[[int], nn.Module]] = {
    'BN': nn.BatchNorm2d,
    'GN': lambda c: nn.GroupNorm(32, c),
    'SN-plain': PlainSwitchableNorm,
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


def uses_backend(layer: nn.Module) -> bool:
    """Whether ``NORM_PLUGINS_BACKEND`` can change how ``layer`` runs (a norm_plugins layer)."""
    return type(layer).__module__.startswith('norm_plugins.')


@contextlib.contextmanager
def backend_env(backend: str):
    """``NORM_PLUGINS_BACKEND=backend`` inside ('-': left as it is)."""
    saved = os.environ.get(ENV_VAR)
    if backend != '-':
        os.environ[ENV_VAR] = backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


def measure(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, backend: str, warmup: int,
            repeats: int):
    """(ms, memory) of ``layer`` with ``NORM_PLUGINS_BACKEND=backend`` ('-': left as it is)."""
    with backend_env(backend):
        return time_fwd_bwd(layer, x, grad, warmup, repeats), extra_memory(layer, x, grad)


def count(layer_names, shape, backends):
    """Launches and host syncs of one training forward and backward, per layer and backend."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    grad = torch.randn(shape, generator=gen)
    for name in layer_names:
        layer = LAYERS[name](shape[1]).train()
        for backend in backends if uses_backend(layer) else ['-']:
            # The torch path as on CUDA: rowwise's CPU-only BatchNorm-kernel route is off.
            cuda_like = mock.patch.object(rowwise, '_channel_blocks', lambda rows: None)
            with backend_env(backend), cuda_like:
                layer(x).backward(grad)  # first calls (lazily built state) are not counted
                x.grad = None
                layer.zero_grad(set_to_none=True)
                outputs = []
                forward = count_launches(lambda: outputs.append(layer(x)))
                backward = count_launches(lambda: outputs[0].backward(grad))
            rows.append(dict(layer=name, backend=backend, forward=forward, backward=backward))
    return rows


def count_markdown(rows) -> str:
    lines = ['| layer | backend | forward (ATen + Triton) | backward (ATen + Triton) | total | host syncs |',
             '| --- | --- | --- | --- | --- | --- |']
    for r in rows:
        f, b = r['forward'], r['backward']
        cells = [f'{sum(t.aten.values())} + {sum(t.triton.values())} = {t.total}' for t in (f, b)]
        lines.append(f"| {r['layer']} | {r['backend']} | {cells[0]} | {cells[1]} | {f.total + b.total} | "
                     f'{f.syncs + b.syncs} |')
    return '\n'.join(lines)


def benchmark(layer_names, shapes, dtypes, device: torch.device, warmup: int, repeats: int,
              backends=('auto',)):
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
            grad = torch.randn(shape, generator=gen, device=device).to(dtype)
            for name in layer_names:
                layer = LAYERS[name](shape[1]).to(device).train()
                if isinstance(layer, nn.Conv2d):
                    # A convolution takes its input's dtype (autocast casts its weights the same way).
                    layer = layer.to(dtype)
                for backend in backends if uses_backend(layer) else ['-']:
                    try:
                        ms, mem = measure(layer, x, grad, backend, warmup, repeats)
                    except RuntimeError as err:  # e.g. an op without a kernel for this dtype/device
                        ms, mem = float('nan'), float('nan')
                        print(f'# {name} {backend} {shape} {dtype_name}: {err}'.splitlines()[0])
                    rows.append(dict(layer=name, backend=backend, shape='x'.join(map(str, shape)),
                                     dtype=dtype_name, ms=ms, memory=mem))
                del layer
            del x, grad
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    return rows


def markdown(rows) -> str:
    header = ['layer', 'backend', 'shape', 'dtype', 'fwd+bwd ms']
    header += [f'x {b}' for b in BASELINES] + ['extra memory (x input)']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    # Baselines are PyTorch layers, measured once whatever the backends.
    by_key = {(r['layer'], r['shape'], r['dtype']): r['ms'] for r in rows if r['backend'] == '-'}
    for r in rows:
        ratios = []
        for base in BASELINES:
            ref = by_key.get((base, r['shape'], r['dtype']))
            ratios.append('-' if ref is None else f"{r['ms'] / ref:.2f}")
        lines.append(f"| {r['layer']} | {r['backend']} | {r['shape']} | {r['dtype']} | "
                     f"{r['ms']:.2f} | "
                     + ' | '.join(ratios) + f" | {r['memory']:.2f} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:index]')
    parser.add_argument('--layers', nargs='+', choices=list(LAYERS),
                        help='default: all; with --count, the norm layers')
    parser.add_argument('--shapes', nargs='+', type=parse_shape,
                        help=f"default: {' '.join(DEFAULT_SHAPES)}; with --count, {COUNT_SHAPE}")
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'], choices=list(DTYPES))
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s)')
    parser.add_argument('--backend', nargs='+', default=None, choices=BACKENDS,
                        help=f'{ENV_VAR} values to measure norm_plugins layers under, side by side '
                             '(default auto; with --count triton and torch)')
    parser.add_argument('--count', action='store_true',
                        help='count kernel launches and host syncs instead of timing (see the docstring)')
    args = parser.parse_args(argv)
    if args.backend is None:
        args.backend = ['triton', 'torch'] if args.count else ['auto']
    if args.layers is None:
        args.layers = list(COUNT_LAYERS if args.count else LAYERS)
    if args.shapes is None:
        args.shapes = [parse_shape(s) for s in ((COUNT_SHAPE,) if args.count else DEFAULT_SHAPES)]

    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was requested but torch sees no GPU; run on a GPU machine or '
                     'drop --device')
    interpreted = os.environ.get('TRITON_INTERPRET') == '1'
    if device.type == 'cpu' and 'triton' in args.backend and not interpreted:
        parser.error('--backend triton on the CPU runs Triton\'s interpreter, which needs '
                     'TRITON_INTERPRET=1 in the environment (slow: for checks, not timings)')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count:
        if device.type != 'cpu':
            parser.error('--count counts launches on the CPU (a dispatch mode); drop --device')
        shape = args.shapes[0]
        print(f'# torch {torch.__version__}, launches of one training forward and backward at '
              f"{'x'.join(map(str, shape))}")
        rows = count(args.layers, shape, args.backend)
        print(count_markdown(rows))
        return rows
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU, {torch.get_num_threads()} threads'
    print(f'# torch {torch.__version__}, {where}')
    rows = benchmark(args.layers, args.shapes, args.dtypes, device, args.warmup, args.repeats,
                     args.backend)
    print(markdown(rows))
    return rows


if __name__ == '__main__':
    main()
