"""Suite-wide isolation from mmengine's process-global state; ``cuda`` tests skip without a GPU."""
import pytest
import torch
from mmengine.registry import DefaultScope


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, rather than fail, on a machine where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (torch.cuda.is_available() is False)')
    for item in items:
        if item.get_closest_marker('cuda'):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_default_scope():
    """A Runner leaves its ``default_scope`` current for the rest of the process, so without this a
    test building through mmdet/mmseg registries would depend on which tests ran before it."""
    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
