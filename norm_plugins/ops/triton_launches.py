"""Triton launches recorded instead of run, and the specialization Triton gives each.

Triton compiles a kernel once per *specialization*: the constexpr values and, for the other
arguments, their types plus whether an integer equals 1 or is a multiple of 16 and whether a
pointer is 16-byte aligned. :func:`recording` collects the launches that
:func:`norm_plugins.ops.triton_rowwise.launch` would make, without running them (so tensors may
be allocated but never touched), and :func:`specialization` computes their keys with Triton's own
rule. ``tools/triton_kernels_report.py`` compiles recorded launches ahead of time for a GPU
architecture, and the tests bound how many variants realistic batch shapes compile.
"""
import contextlib
import inspect
from typing import Dict, Iterator, List, NamedTuple, Tuple

from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend

from .backend import LAUNCH_LISTENERS

# Launch options that are not kernel arguments.
OPTIONS = ('num_warps',)


class RecordedLaunch(NamedTuple):
    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    constexprs: Dict[str, object]

    @property
    def name(self) -> str:
        return _function(self.kernel).__name__


def _function(kernel):
    return getattr(kernel, 'fn', kernel)


@contextlib.contextmanager
def recording() -> Iterator[List[RecordedLaunch]]:
    """Within the block, launches are recorded into the yielded list and not run."""
    launches: List[RecordedLaunch] = []

    @contextlib.contextmanager
    def record(kernel, grid, args, options):
        launches.append(RecordedLaunch(kernel, tuple(grid), tuple(args), dict(options)))
        yield False

    LAUNCH_LISTENERS.append(record)
    try:
        yield launches
    finally:
        LAUNCH_LISTENERS.remove(record)


def arguments(launch: RecordedLaunch) -> Dict[str, Tuple]:
    """Each kernel parameter's specialization, in order: ``('constexpr', value)`` or Triton's
    ``(type, attributes)`` (``'D'``: a multiple of 16, or a 16-byte aligned pointer)."""
    names = list(inspect.signature(_function(launch.kernel)).parameters)
    positional = dict(zip(names, launch.args))
    result = {}
    for name in names:
        if name in launch.constexprs:
            result[name] = ('constexpr', launch.constexprs[name])
        else:
            result[name] = tuple(native_specialize_impl(CUDABackend, positional[name], False, True, True))
    return result


def specialization(launch: RecordedLaunch) -> Tuple:
    """The key Triton caches this launch's compiled kernel under (with its launch options)."""
    options = tuple((k, launch.constexprs[k]) for k in OPTIONS if k in launch.constexprs)
    return tuple(arguments(launch).values()) + options
