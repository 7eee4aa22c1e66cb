"""norm_plugins: SN, SyncSN, BCN and WSConv for mmdet and mmsegmentation.

Importing the package registers every layer on mmengine's root registries, where mmcv's
``build_norm_layer``/``build_conv_layer`` and mmdet/mmseg scopes find them.
"""
from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS

from .hooks import BCNUpdateRateHook, PreciseStatsHook, SNHardRatiosHook, SNRatioLoggerHook
from .layers import (BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv1d, WSConv2d,
                     WSConv3d)
from .models import build_pool_norm_aspp_head, build_pool_norm_psp_head
from .optim import NormAwareOptimWrapperConstructor
from .pretrained import register_scheme
from .registry import register
from .version import __version__

register(MODELS, 'SN', SwitchableNorm)
register(MODELS, 'SyncSN', SyncSwitchableNorm)
register(MODELS, 'BCN', BatchChannelNorm)
register(MODELS, 'WSConv', WSConv2d)
register(MODELS, 'WSConv1d', WSConv1d)
register(MODELS, 'WSConv2d', WSConv2d)
register(MODELS, 'WSConv3d', WSConv3d)
register(HOOKS, 'BCNUpdateRateHook', BCNUpdateRateHook)
register(HOOKS, 'PreciseStatsHook', PreciseStatsHook)
register(HOOKS, 'SNRatioLoggerHook', SNRatioLoggerHook)
register(HOOKS, 'SNHardRatiosHook', SNHardRatiosHook)
register(MODELS, 'PoolNormASPPHead', build_pool_norm_aspp_head)
register(MODELS, 'PoolNormPSPHead', build_pool_norm_psp_head)
register(OPTIM_WRAPPER_CONSTRUCTORS, 'NormAwareOptimWrapperConstructor', NormAwareOptimWrapperConstructor)
# init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://NAME') loads manifest entries.
register_scheme()

__all__ = ['BatchChannelNorm', 'BCNUpdateRateHook', 'NormAwareOptimWrapperConstructor', 'PreciseStatsHook',
           'SNHardRatiosHook', 'SNRatioLoggerHook', 'SwitchableNorm',
           'SyncSwitchableNorm', 'WSConv1d', 'WSConv2d', 'WSConv3d', '__version__']
