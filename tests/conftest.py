"""Suite-wide isolation from mmengine's process-global state; ``cuda`` tests skip without a GPU.

Importable without mmengine, for the torch-only tests (tests/test_cuda.py on a bare GPU machine,
tests/test_torch_only.py).
"""
import os

import pytest
import torch

try:
    from mmengine.registry import DefaultScope
except ModuleNotFoundError as err:
    if err.name != 'mmengine':
        raise
    DefaultScope = None  # torch only: no mmengine state to isolate

# Triton chooses between its interpreter and compiled kernels once per process, when it is first
# imported. Without a GPU the interpreter is the only way to run the kernels (CI); on a GPU machine
# the variable is left as the user set it, so that the cuda tests run compiled kernels.
if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, rather than fail, on a machine where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (torch.cuda.is_available() is False)')
    for item in items:
        if item.get_closest_marker('cuda'):
            item.add_marker(skip)


if DefaultScope is not None:
    @pytest.fixture(autouse=True)
    def isolated_default_scope():
        """A Runner leaves its ``default_scope`` current for the rest of the process, so without this a
        test building through mmdet/mmseg registries would depend on which tests ran before it."""
        saved = DefaultScope._instance_dict.copy()
        yield
        DefaultScope._instance_dict.clear()
        DefaultScope._instance_dict.update(saved)
