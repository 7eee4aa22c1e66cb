"""Loading mmengine checkpoints under torch's ``weights_only`` unpickler.

torch >= 2.6 calls ``torch.load(..., weights_only=True)`` by default, and mmengine 0.10.7 does not
pass ``weights_only``. A checkpoint written by mmengine's Runner holds, besides tensors and plain
containers, the ``MessageHub`` state: ``HistoryBuffer`` objects whose pickles reference numpy
arrays and ``getattr(HistoryBuffer, 'mean')``-style method lookups. Rather than turning the safe
unpickler off, :func:`mmengine_checkpoint_globals` allowlists exactly those globals, and stands in
for ``getattr`` with a version that resolves only HistoryBuffer's statistics methods.
"""
import pickle
from contextlib import contextmanager
from typing import Any, Iterator, List

import numpy as np
import torch
from mmengine.logging import HistoryBuffer


# HistoryBuffer's built-in statistics; its class-level registry only fills in when a first
# instance is created, so a fresh process would not know them yet.
_DEFAULT_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_method(owner: Any, name: str) -> Any:
    """``getattr`` as a checkpoint may call it: only ``HistoryBuffer.<statistics method>``."""
    if owner is HistoryBuffer and (name in _DEFAULT_STATISTICS or name in HistoryBuffer._statistics_methods):
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for getattr({owner!r}, {name!r}); only HistoryBuffer statistics methods are '
        'allowed. Load it with torch.load(..., weights_only=False) only if you trust its source.')


def _numpy_reconstruct():
    # numpy 2 moved numpy.core to numpy._core; pickles name the module of the running version.
    core = getattr(np, '_core', None) or np.core
    return core.multiarray._reconstruct, core.multiarray.scalar, core.multiarray.__name__


# numpy dtypes of plain numbers; unpickling an array builds its dtype object, whose class must be
# allowlisted too (numpy >= 1.25 has one class per dtype).
_NUMERIC_DTYPES = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64',
                   'float16', 'float32', 'float64')


def mmengine_safe_globals() -> List[Any]:
    """The globals an mmengine Runner checkpoint needs, for ``torch.serialization.safe_globals``."""
    reconstruct, scalar, module = _numpy_reconstruct()
    dtype_classes = {type(np.dtype(name)) for name in _NUMERIC_DTYPES} - {np.dtype}
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        *sorted(dtype_classes, key=lambda cls: cls.__name__),
        (reconstruct, f'{module}._reconstruct'),
        (scalar, f'{module}.scalar'),
        (_history_buffer_method, 'builtins.getattr'),
    ]


@contextmanager
def mmengine_checkpoint_globals() -> Iterator[None]:
    """Within this block, ``weights_only`` loading accepts mmengine Runner checkpoints."""
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield
