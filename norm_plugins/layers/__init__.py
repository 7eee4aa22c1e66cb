from .batch_channel_norm import BatchChannelNorm
from .switchable_norm import SwitchableNorm, SyncSwitchableNorm
from .weight_standardization import WSConv1d, WSConv2d, WSConv3d

__all__ = ['BatchChannelNorm', 'SwitchableNorm', 'SyncSwitchableNorm', 'WSConv1d', 'WSConv2d', 'WSConv3d']
