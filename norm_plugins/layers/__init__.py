from .batch_channel_norm import BatchChannelNorm
from .sparse_switchable_norm import SparseSwitchableNorm, SyncSparseSwitchableNorm
from .switchable_norm import SwitchableNorm, SyncSwitchableNorm
from .weight_standardization import WSConv1d, WSConv2d, WSConv3d

__all__ = ['BatchChannelNorm', 'SparseSwitchableNorm', 'SwitchableNorm', 'SyncSparseSwitchableNorm',
           'SyncSwitchableNorm', 'WSConv1d', 'WSConv2d', 'WSConv3d']
