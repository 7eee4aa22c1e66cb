"""norm_plugins: SN, SyncSN, SSN, BCN and WSConv for mmdet and mmsegmentation.

The layers need only torch (and triton for their GPU kernels), so they also serve plain PyTorch code.
With mmengine installed, importing the package registers every layer on mmengine's root registries,
where mmcv's ``build_norm_layer``/``build_conv_layer`` and mmdet/mmseg scopes find them. Without it
the import warns (:class:`OpenMMLabMissingWarning`) and the OpenMMLab parts raise an ImportError
that says what to install.
"""
import warnings

from .layers import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SyncSparseSwitchableNorm,
                     SyncSwitchableNorm, WSConv1d, WSConv2d, WSConv3d)
from .version import __version__

_OPENMMLAB_INSTALL = ('bash tools/setup_env.sh in a norm_plugins checkout (it also builds mmcv\'s ops), or '
                     'pip install mmengine==0.10.7 mmcv==2.1.0 mmdet==3.3.0 mmsegmentation==1.2.2')
# What the package binds only with mmengine installed (see the registration below).
_OPENMMLAB_ONLY = frozenset([
    'BCNUpdateRateHook', 'MixtureClipAmpOptimWrapper', 'MixtureClipOptimWrapper', 'NormAwareOptimWrapperConstructor',
    'PreciseStatsHook', 'SNHardRatiosHook', 'SNRatioLoggerHook', 'SSNRadiusHook', 'build_pool_norm_aspp_head',
    'build_pool_norm_psp_head', 'register', 'register_scheme', 'hooks', 'models', 'optim', 'pretrained', 'registry'])
_TORCH_ONLY_ALL = ['BatchChannelNorm', 'OpenMMLabMissingWarning', 'SparseSwitchableNorm', 'SwitchableNorm',
                   'SyncSparseSwitchableNorm', 'SyncSwitchableNorm', 'WSConv1d', 'WSConv2d', 'WSConv3d',
                   '__version__']


class OpenMMLabMissingWarning(UserWarning):
    """``import norm_plugins`` without mmengine: the layers work, the OpenMMLab parts do not."""


def __getattr__(name: str):
    # Reached only for names not bound below, so OpenMMLab names only when mmengine is missing.
    if name in _OPENMMLAB_ONLY:
        raise ImportError(f'norm_plugins.{name} needs mmengine, which is not installed (mmcv, mmdet and '
                          f'mmsegmentation are needed too for the OpenMMLab parts); install them with '
                          f'{_OPENMMLAB_INSTALL}', name='mmengine')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


try:
    from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS
except ModuleNotFoundError as err:
    if err.name != 'mmengine':  # mmengine is there but cannot import: its own error says why
        raise
    warnings.warn(
        'norm_plugins: mmengine is not installed, so only the layers are usable: SwitchableNorm, '
        'SyncSwitchableNorm, SparseSwitchableNorm, SyncSparseSwitchableNorm, BatchChannelNorm and '
        'WSConv1d/2d/3d work in plain PyTorch '
        '(norm_plugins.layers, with the Triton kernels). The OpenMMLab parts (norm_cfg/conv_cfg '
        'registration, hooks, NormAwareOptimWrapperConstructor, decode heads, pretrained backbones, '
        'the training and analysis tools) need mmengine, mmcv, mmdet and mmsegmentation: install them '
        f'with {_OPENMMLAB_INSTALL}', OpenMMLabMissingWarning, stacklevel=2)
    __all__ = _TORCH_ONLY_ALL
else:
    from .hooks import BCNUpdateRateHook, PreciseStatsHook, SNHardRatiosHook, SNRatioLoggerHook, SSNRadiusHook
    from .models import build_pool_norm_aspp_head, build_pool_norm_psp_head
    from .optim import MixtureClipAmpOptimWrapper, MixtureClipOptimWrapper, NormAwareOptimWrapperConstructor
    from .pretrained import register_scheme
    from .registry import register

    register(MODELS, 'SN', SwitchableNorm)
    register(MODELS, 'SyncSN', SyncSwitchableNorm)
    register(MODELS, 'SSN', SparseSwitchableNorm)
    register(MODELS, 'SyncSSN', SyncSparseSwitchableNorm)
    register(MODELS, 'BCN', BatchChannelNorm)
    register(MODELS, 'WSConv', WSConv2d)
    register(MODELS, 'WSConv1d', WSConv1d)
    register(MODELS, 'WSConv2d', WSConv2d)
    register(MODELS, 'WSConv3d', WSConv3d)
    register(HOOKS, 'BCNUpdateRateHook', BCNUpdateRateHook)
    register(HOOKS, 'PreciseStatsHook', PreciseStatsHook)
    register(HOOKS, 'SNRatioLoggerHook', SNRatioLoggerHook)
    register(HOOKS, 'SNHardRatiosHook', SNHardRatiosHook)
    register(HOOKS, 'SSNRadiusHook', SSNRadiusHook)
    register(MODELS, 'PoolNormASPPHead', build_pool_norm_aspp_head)
    register(MODELS, 'PoolNormPSPHead', build_pool_norm_psp_head)
    register(OPTIM_WRAPPER_CONSTRUCTORS, 'NormAwareOptimWrapperConstructor', NormAwareOptimWrapperConstructor)
    register(OPTIM_WRAPPERS, 'MixtureClipOptimWrapper', MixtureClipOptimWrapper)
    register(OPTIM_WRAPPERS, 'MixtureClipAmpOptimWrapper', MixtureClipAmpOptimWrapper)
    # init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://NAME') loads manifest entries.
    register_scheme()

    __all__ = sorted(_TORCH_ONLY_ALL + ['BCNUpdateRateHook', 'MixtureClipAmpOptimWrapper', 'MixtureClipOptimWrapper',
                                        'NormAwareOptimWrapperConstructor', 'PreciseStatsHook', 'SNHardRatiosHook',
                                        'SNRatioLoggerHook', 'SSNRadiusHook'])
