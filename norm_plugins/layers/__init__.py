from .switchable_norm import SwitchableNorm, SyncSwitchableNorm

__all__ = ['SwitchableNorm', 'SyncSwitchableNorm']
