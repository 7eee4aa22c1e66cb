"""Suite-wide isolation from mmengine's process-global state."""
import pytest
from mmengine.registry import DefaultScope


@pytest.fixture(autouse=True)
def isolated_default_scope():
    """A Runner leaves its ``default_scope`` current for the rest of the process, so without this a
    test building through mmdet/mmseg registries would depend on which tests ran before it."""
    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
