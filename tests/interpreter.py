"""The module-level condition of the tests that run Triton kernels through its interpreter."""
import os

import numpy
import pytest


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split('+')[0].split('.')[:2])


def require_interpreter(module: str) -> None:
    """Skip the calling test module unless this process runs Triton's interpreter and can.

    tests/conftest.py chooses the interpreter for the process on machines without a GPU; on a GPU
    machine the kernels compile instead, and the module needs a process of its own. Triton < 3.7's
    interpreter cannot run a kernel with numpy >= 2.4: it turns loop bounds into ints with
    ``int(array)`` on one-element arrays, which numpy 2.4 refuses (3.7 squeezes them first). That is
    the interpreter alone: the compiled kernels of such a triton are checked by
    tools/triton_kernels_report.py, and the same kernels pass this module under it with numpy < 2.4.
    """
    if os.environ.get('TRITON_INTERPRET') != '1':
        pytest.skip('a CUDA machine runs compiled Triton kernels in this process: run the interpreter tests '
                    f'alone with TRITON_INTERPRET=1 pytest {module}', allow_module_level=True)
    import triton
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run kernels with numpy "
                    f'{numpy.__version__} (int() of a one-element array, refused since numpy 2.4; fixed in '
                    'triton 3.7): the compiled kernels are checked by tools/triton_kernels_report.py',
                    allow_module_level=True)
