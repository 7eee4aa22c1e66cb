"""Counting the kernel launches and host-device synchronizations of a piece of eager code.

On a GPU every ATen op that computes something is at least one kernel launch, of several
microseconds whatever its size; views, allocations and metadata are not. A dispatch mode sees every
ATen op, also on the CPU, so the launch count of a layer's forward or backward can be taken
without a GPU. Triton launches are counted where :func:`norm_plugins.ops.triton_rowwise.launch`
makes them (:data:`~norm_plugins.ops.backend.LAUNCH_LISTENERS`); the ATen ops Triton's interpreter runs inside a launch (its copies between "device" and
host) are not counted. A synchronization is an op whose result the host must wait for (``.item()``,
``bool(tensor)``, data-dependent shapes).
"""
import collections
import contextlib
from typing import Callable, Counter, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .backend import LAUNCH_LISTENERS

aten = torch.ops.aten
# Ops that launch nothing: allocations, aliasing and metadata.
NO_LAUNCH = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
             aten.detach, aten.alias, aten.lift_fresh, aten._unsafe_view, aten.set_, aten.resize_, aten.sym_size, aten.sym_stride,
             aten.sym_numel, aten.sym_storage_offset, aten.is_same_size, aten.is_contiguous}
# Ops whose result the host waits for.
SYNCS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select, aten.allclose}
COLLECTIVE_NAMESPACES = ('c10d', '_c10d_functional')


class Launches(NamedTuple):
    """ATen ops that launch kernels (by name), Triton launches (by kernel), host syncs and
    collectives (all-reduces of synchronized layers, counted apart from the launches)."""
    aten: Counter
    triton: Counter
    syncs: int
    collectives: int

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())


class _Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten: Counter = collections.Counter()
        self.triton: Counter = collections.Counter()
        self.syncs = 0
        self.collectives = 0
        self._in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_launch:
            packet = func.overloadpacket
            if func.namespace in COLLECTIVE_NAMESPACES:
                self.collectives += 1
            elif packet in SYNCS:
                self.syncs += 1
            elif packet not in NO_LAUNCH and not func.is_view:
                self.aten[packet.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def triton_launch(self, kernel, grid, args, options):
        self.triton[getattr(kernel, '__name__', None) or kernel.fn.__name__] += 1
        self._in_launch += 1
        try:
            yield
        finally:
            self._in_launch -= 1


def count_launches(fn: Callable[[], object]) -> Launches:
    """Run ``fn()`` and count what it launches (see the module docstring)."""
    counting = _Counting()
    LAUNCH_LISTENERS.append(counting.triton_launch)
    try:
        with counting:
            fn()
    finally:
        LAUNCH_LISTENERS.remove(counting.triton_launch)
    return Launches(counting.aten, counting.triton, counting.syncs, counting.collectives)
