"""Which implementation of the row-wise primitives (:mod:`norm_plugins.ops.rowwise`) a tensor uses.

``NORM_PLUGINS_BACKEND`` selects it:

- ``auto`` (default): CUDA tensors use the Triton kernels, everything else the torch path;
- ``triton``: every tensor uses the Triton kernels; CPU tensors need ``TRITON_INTERPRET=1``
  (Triton's interpreter, how CI tests the kernels);
- ``torch``: the torch path everywhere.

A CUDA tensor under ``auto`` without an importable Triton falls back to the torch path with one
warning.
"""
import functools
import os
import warnings
from typing import Callable, List

from torch import Tensor

BACKENDS = ('auto', 'triton', 'torch')
ENV_VAR = 'NORM_PLUGINS_BACKEND'
# Context-manager factories entered around every Triton launch, called with the kernel, its grid,
# positional arguments and keyword (constexpr and launch) options; see triton_rowwise.launch.
LAUNCH_LISTENERS: List[Callable] = []


def requested_backend() -> str:
    """The value of ``NORM_PLUGINS_BACKEND`` (read at every call, so tests may change it)."""
    value = os.environ.get(ENV_VAR, 'auto').strip().lower() or 'auto'
    if value not in BACKENDS:
        raise ValueError(f'{ENV_VAR}={value!r} is not a backend; use one of {BACKENDS} '
                         '(auto: Triton kernels for CUDA tensors, torch otherwise).')
    return value


_TRITON_AVAILABLE: List[bool] = []


def triton_available() -> bool:
    """Whether triton imports (tried once; a plain cache, which torch.compile traces without the
    warning an lru_cache draws)."""
    if not _TRITON_AVAILABLE:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_AVAILABLE.append(False)
        else:
            _TRITON_AVAILABLE.append(True)
    return _TRITON_AVAILABLE[0]


def use_triton(x: Tensor) -> bool:
    """Whether the row-wise primitives run ``x`` through the Triton kernels."""
    backend = requested_backend()
    if backend == 'torch':
        return False
    if backend == 'triton':
        if not triton_available():
            raise RuntimeError(f'{ENV_VAR}=triton but triton is not importable; install it '
                               f'(pip install triton) or set {ENV_VAR}=auto.')
        if x.device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
            raise RuntimeError(f'{ENV_VAR}=triton with a CPU tensor needs TRITON_INTERPRET=1 (Triton '
                               f'interpreter); unset {ENV_VAR} or move the model to a GPU.')
        return True
    if x.device.type != 'cuda':
        return False
    if not triton_available():
        _warn_no_triton()
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn('norm_plugins: triton is not installed, so SN/SyncSN/BCN run on CUDA through the '
                  'slower torch path; install triton (the CUDA builds of torch bring it) for the fused '
                  'kernels.', RuntimeWarning, stacklevel=3)
