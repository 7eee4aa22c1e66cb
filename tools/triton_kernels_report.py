"""Compile the row-wise Triton kernels for a GPU without one, and report what the compiler made.

    python tools/triton_kernels_report.py          # sm_90 (H100, H200), float32 and bfloat16
    python tools/triton_kernels_report.py --arch 80 --dtypes float32

Each kernel is compiled as a real launch specializes it (unit strides become constants; pointers,
sizes and other strides are multiples of 16) with the tiles :func:`make_plan` picks for an NCL and a
channels-last 2x256x200x336 input. The table gives registers per thread, stack bytes (spills),
shared memory, and the widest global load and store in the PTX (128 bits: 16-byte accesses).
ptxas ships with triton; run without ``TRITON_INTERPRET=1``, which leaves nothing to compile.
"""
import argparse
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from norm_plugins.ops import triton_kernels as kernels
from norm_plugins.ops.triton_rowwise import DEFAULT_SM_COUNT, NUM_WARPS, make_plan

SHAPE = (2, 256, 200 * 336)
LAYOUTS = {'ncl': (SHAPE[1] * SHAPE[2], SHAPE[2], 1),
           'channels-last': (SHAPE[1] * SHAPE[2], 1, SHAPE[1])}
POINTER_TYPES = {'float32': '*fp32', 'bfloat16': '*bf16', 'float16': '*fp16'}
# kernel -> (pointers holding x's dtype, the other constexpr arguments)
KERNELS = {
    'moments_kernel': (('x_ptr',), dict(FINAL=False)),
    'grad_sums_kernel': (('g_ptr', 'x_ptr'), dict(FINAL=False)),
    'normalize_kernel': (('x_ptr', 'y_ptr'), {}),
    'normalize_backward_kernel': (('g_ptr', 'x_ptr', 'dx_ptr'), {}),
}
# Integer arguments a launch sees as multiples of 16 (the unit stride is a constant instead).
DIVISIBLE = re.compile(r'_ptr$|^stride_|^(L|C|R|chunk)$')


def compile_kernel(name: str, layout: str, dtype: str, arch: int):
    jit_fn = getattr(kernels, name)
    tensor_ptrs, constexprs = KERNELS[name]
    plan = make_plan(SHAPE, LAYOUTS[layout], DEFAULT_SM_COUNT)
    constexprs = dict(constexprs, BLOCK_C=plan.block_c, BLOCK_L=plan.block_l)
    unit_axis = 'l' if layout == 'ncl' else 'c'
    names = list(inspect.signature(jit_fn.fn).parameters)
    for arg in names:  # x, g and the output share the layout
        if arg.startswith('stride_') and arg.endswith(unit_axis) and arg[-2] in 'xgyd':
            constexprs[arg] = 1
    signature = {arg: 'constexpr' if arg in constexprs else 'i32' for arg in names}
    for arg in names:
        if arg.endswith('_ptr'):  # (N, C) statistics and partials are float32
            signature[arg] = POINTER_TYPES[dtype] if arg in tensor_ptrs else '*fp32'
    attrs = {(i,): [['tt.divisibility', 16]] for i, arg in enumerate(names)
             if arg not in constexprs and DIVISIBLE.search(arg)}
    source = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=NUM_WARPS)
    return triton.compile(source, target=GPUTarget('cuda', arch, 32), options=options), plan


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, default=90, help='compute capability x 10 (90: Hopper)')
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'],
                        choices=list(POINTER_TYPES))
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') == '1':
        parser.error('TRITON_INTERPRET=1 makes the kernels interpreted Python; unset it to compile '
                     'them')
    rows = []
    shape = 'x'.join(map(str, SHAPE))
    print(f'# triton {triton.__version__}, sm_{args.arch}, {NUM_WARPS} warps, input {shape}')
    columns = ['kernel', 'layout', 'dtype', 'tile', 'registers', 'stack', 'shared', 'load bits',
               'store bits']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + ' --- |' * len(columns))
    for name in KERNELS:
        for layout in LAYOUTS:
            for dtype in args.dtypes:
                compiled, plan = compile_kernel(name, layout, dtype, args.arch)
                row = dict(kernel=name, layout=layout, dtype=dtype, **resources(compiled))
                rows.append(row)
                cells = [name, layout, dtype, f'{plan.block_c}x{plan.block_l}'] + [
                    row[k] for k in ('registers', 'stack', 'shared', 'load_bits', 'store_bits')]
                print('| ' + ' | '.join(map(str, cells)) + ' |')
    return rows


if __name__ == '__main__':
    main()
