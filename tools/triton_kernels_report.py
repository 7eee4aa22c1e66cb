"""Compile the Triton kernels for a GPU without one, and report what the compiler made.

    python tools/triton_kernels_report.py          # sm_90 (H100, H200), float32 and bfloat16
    python tools/triton_kernels_report.py --arch 80 --dtypes float32

The row-wise passes are compiled exactly as the layers launch them: their launches are recorded
(:mod:`norm_plugins.ops.triton_launches`, nothing runs) for the FPN levels of an 800x1344 image at
2 images, 2x256xL with L = 67200 (P2), 4200 (P4), 1050 (P5) and 273 (P6), NCL and channels-last,
so the tiles, splits and the INT64/ROW_ALIGN flags are the planner's and every integer and pointer
argument is specialized by Triton's own rule. The (N, C) coefficient kernels of SN and BCN are
compiled once each at 2x256 (default options, training); launches that specialize alike compile
once, as they would on a GPU. The table gives registers per thread,
stack bytes (spills), shared memory, and the widest global load and store in the PTX (128 bits:
16-byte accesses). ptxas ships with triton; run without ``TRITON_INTERPRET=1``, which leaves
nothing to compile.
"""
import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from norm_plugins.ops import triton_norms, triton_rowwise
from norm_plugins.ops.triton_launches import arguments, recording, specialization

LEVELS = {'P2': 200 * 336, 'P4': 50 * 84, 'P5': 25 * 42, 'P6': 13 * 21}
BATCH, CHANNELS = 2, 256
LAYOUTS = ('ncl', 'channels-last')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
META = torch.device('meta')


def rows(length: int, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A meta (N, C, L) tensor in ``layout``, as a layer sees its input."""
    if layout == 'ncl':
        return torch.empty((BATCH, CHANNELS, length), dtype=dtype, device=META)
    return torch.empty((BATCH, length, CHANNELS), dtype=dtype, device=META).transpose(1, 2)


def row_pass_launches(length: int, layout: str, dtype: torch.dtype):
    """The launches of the four passes (and their combines) for one input."""
    x, g = rows(length, layout, dtype), rows(length, layout, dtype)
    m, a, b, p, q = (torch.empty((BATCH, CHANNELS), device=META) for _ in range(5))
    with recording() as launches:
        triton_rowwise.row_moments_impl(x)
        triton_rowwise.row_normalize_impl(x, m, a, b)
        triton_rowwise.row_grad_sums_impl(g, x, m)
        triton_rowwise.row_normalize_backward_impl(g, x, m, a, p, q)
    return launches


def coefficient_launches():
    """One launch of each coefficient kernel: SN (all normalizers, logits) and BCN in training."""
    n, c, groups, spatial = BATCH, CHANNELS, 32, LEVELS['P4']
    means = torch.empty((n, c), dtype=torch.float64, device=META)
    stats = [torch.empty((n, c), device=META) for _ in range(3)]  # variances, sum g, sum g (x - centre)
    mix = torch.empty(3, device=META)
    weight, bias, gw, gb = (torch.empty(size, device=META) for size in (c, c, groups, groups))
    running = [torch.empty(c, device=META), torch.empty(c, device=META), torch.empty((), dtype=torch.long,
                                                                                        device=META)]
    with recording() as launches:
        sums = triton_norms.batch_sums(means, stats[0], None, None, spatial, False)
        centre, mean, rstd, _, _, ln, bn = triton_norms.sn_forward(
            means, stats[0], mix, mix, weight, bias, sums, *running, 'in,ln,bn', True, 1, True, 0.1, 1e-5, False,
            spatial)
        _, _, dbn, part = triton_norms.sn_channel_grads(stats[1], stats[2], means, stats[0], ln, bn, *running[:2],
                                                        centre, mean, rstd, weight, mix, mix, 'in,ln,bn', True, 1,
                                                        False, spatial)
        triton_norms.sn_sample_grads(stats[1], stats[2], means, ln, bn, dbn, sums, centre, mean, rstd, weight, mix,
                                     mix, 'in,ln,bn', True, True, False, spatial)
        triton_norms.sn_ratio_grads(part, mix, mix, 'in,ln,bn', True, False)
        centre, _, _, moments = triton_norms.bcn_forward(means, stats[0], sums, None, None, None, weight, bias, gw,
                                                         gb, *running, groups, 1e-5, 0.1, 1, True)
        e1, e2, grp, _, p, q = triton_norms.bcn_sample_grads(stats[1], stats[2], means, stats[0], centre, moments,
                                                             weight, bias, gw, groups, 1e-5, spatial)
        _, _, _, _, f = triton_norms.bcn_channel_grads(e1, e2, grp, means, centre, moments, weight, sums, p, q,
                                                       groups, 1e-5, True, True)
        triton_norms.bcn_batch_terms(f, centre, moments, weight, sums, p, q, 1e-5)
    return launches


def compile_launch(launch, arch: int):
    """Compile a recorded launch for ``sm_{arch}`` with the specialization it would get."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, (kind, value)) in enumerate(arguments(launch).items()):
        if kind == 'constexpr':
            signature[name] = 'constexpr'
            constexprs[name] = value
        else:
            signature[name] = kind
            if isinstance(value, str) and value:
                attrs[(i,)] = CUDABackend.parse_attr(value)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=launch.constexprs['num_warps'], enable_fp_fusion=True)
    return triton.compile(source, target=GPUTarget('cuda', arch, 32), options=options)


def resources(compiled) -> dict:
    """Registers and stack from the cubin (cuobjdump), widest global accesses from the PTX."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                             'cuobjdump')
    with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
        cubin.write(compiled.asm['cubin'])
        cubin.flush()
        usage = subprocess.run([cuobjdump, '-res-usage', cubin.name], capture_output=True,
                               text=True, check=True).stdout
    ptx = compiled.asm['ptx']

    def widest(op):
        accesses = re.findall(rf'{op}\.global(?:\.\w+)*?(?:\.v(\d))?\.b(\d+)', ptx)
        widths = [int(vector or 1) * int(bits) for vector, bits in accesses]
        return max(widths, default=0)

    return dict(registers=int(re.search(r'REG:(\d+)', usage).group(1)),
                stack=int(re.search(r'STACK:(\d+)', usage).group(1)),
                shared=compiled.metadata.shared, load_bits=widest('ld'), store_bits=widest('st'))


COLUMNS = ['kernel', 'level', 'layout', 'dtype', 'tile', 'split', 'INT64', 'ROW_ALIGN', 'registers', 'stack',
           'shared', 'load bits', 'store bits']


def describe(launch, level: str, layout: str, dtype: str, compiled) -> dict:
    options = launch.constexprs
    tile = f"{options['BLOCK_C']}x{options['BLOCK_L']}" if 'BLOCK_L' in options else str(options.get('BLOCK_C', '-'))
    split = launch.grid[1] if len(launch.grid) > 1 else 1
    return dict(kernel=launch.name, level=level, layout=layout, dtype=dtype, tile=tile, split=split,
                INT64=options.get('INT64', '-'), ROW_ALIGN=options.get('ROW_ALIGN', '-'), **resources(compiled))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, default=90, help='compute capability x 10 (90: Hopper)')
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'], choices=list(DTYPES))
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') == '1':
        parser.error('TRITON_INTERPRET=1 makes the kernels interpreted Python; unset it to compile '
                     'them')
    levels = ', '.join(f'{name} L={length}' for name, length in LEVELS.items())
    print(f'# triton {triton.__version__}, sm_{args.arch}, input {BATCH}x{CHANNELS}xL ({levels})')
    print('| ' + ' | '.join(COLUMNS) + ' |')
    print('|' + ' --- |' * len(COLUMNS))
    rows_out, compiled = [], {}
    cases = [(launch, level, layout, dtype) for level, length in LEVELS.items() for layout in LAYOUTS
             for dtype in args.dtypes for launch in row_pass_launches(length, layout, DTYPES[dtype])]
    cases += [(launch, '-', '-', 'float32') for launch in coefficient_launches()]
    for launch, level, layout, dtype in cases:
        key = (launch.name, specialization(launch))
        if key not in compiled:  # levels that specialize alike compile once, as on a GPU
            compiled[key] = compile_launch(launch, args.arch)
        row = describe(launch, level, layout, dtype, compiled[key])
        rows_out.append(row)
        print('| ' + ' | '.join(str(row[c.replace(' ', '_')] if c.replace(' ', '_') in row else row[c])
                                for c in COLUMNS) + ' |')
    return rows_out


if __name__ == '__main__':
    main()
