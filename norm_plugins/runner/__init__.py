"""What tools/train.py and tools/test.py run: config handling, CPU distributed launch, safe
checkpoint loading and exact resumption. The scripts themselves only call :mod:`.entrypoints`."""
from mmengine.registry import HOOKS

from ..registry import register
from .checkpoint_safety import mmengine_checkpoint_globals, mmengine_safe_globals
from .errors import ToolError
from .layer_summary import count_layers, describe_layers
from .rng_state_hook import TorchRNGStateHook

register(HOOKS, 'TorchRNGStateHook', TorchRNGStateHook)

__all__ = ['ToolError', 'TorchRNGStateHook', 'count_layers', 'describe_layers', 'mmengine_checkpoint_globals',
           'mmengine_safe_globals']
