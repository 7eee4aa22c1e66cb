"""norm_plugins: SN, SyncSN, BCN and WSConv for mmdet and mmsegmentation.

Importing the package registers every layer on mmengine's root registries, where mmcv's
``build_norm_layer``/``build_conv_layer`` and mmdet/mmseg scopes find them.
"""
from mmengine.registry import MODELS

from .layers import SwitchableNorm, SyncSwitchableNorm
from .registry import register
from .version import __version__

register(MODELS, 'SN', SwitchableNorm)
register(MODELS, 'SyncSN', SyncSwitchableNorm)

__all__ = ['SwitchableNorm', 'SyncSwitchableNorm', '__version__']
