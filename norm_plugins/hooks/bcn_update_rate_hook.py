"""Sets the update rate r of every micro-batch BCN layer to the learning rate, as the BCN paper
does (Sec. 7.2.2: "we set the update rate r to be the learning rate of trainable parameters")."""
import warnings
from typing import Dict, List, Optional

from mmengine.hooks import Hook
from mmengine.optim import OptimWrapperDict

from ..layers.batch_channel_norm import BatchChannelNorm


class BCNUpdateRateHook(Hook):
    """Before every training iteration, ``r = factor * lr`` for each BCN built with ``estimate=True``.

    ``lr`` is the current learning rate of the optimizer parameter group holding the layer's
    ``weight`` (so warmup, decay and ``paramwise_cfg`` multipliers carry over), or of the first
    group when the layer has no parameters in the optimizer (``affine=False``). Use it with
    ``custom_hooks = [dict(type='BCNUpdateRateHook')]``.

    Args:
        factor: scale applied to the learning rate; ``factor * lr`` must stay within [0, 1].
    """
    priority = 'NORMAL'

    def __init__(self, factor: float = 1.0):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
            raise ValueError(f'BCNUpdateRateHook: factor must be a non-negative number, got {factor!r}')
        self.factor = factor
        self._layers: Optional[List[BatchChannelNorm]] = None

    def before_train(self, runner) -> None:
        self._layers = [m for m in runner.model.modules() if isinstance(m, BatchChannelNorm) and m.estimate]
        if not self._layers:
            warnings.warn('BCNUpdateRateHook: the model has no BCN layer with estimate=True; the hook '
                          'does nothing. Remove it or use norm_cfg=dict(type=\'BCN\', estimate=True).')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._layers is None:
            self.before_train(runner)
        if not self._layers:
            return
        groups = _param_groups(runner.optim_wrapper)
        lr_of: Dict[int, float] = {id(p): group['lr'] for group in groups for p in group['params']}
        default_lr = groups[0]['lr']
        for layer in self._layers:
            lr = lr_of.get(id(layer.weight), default_lr) if layer.affine else default_lr
            layer.set_update_rate(self.factor * lr)


def _param_groups(optim_wrapper) -> list:
    if isinstance(optim_wrapper, OptimWrapperDict):
        return [group for wrapper in optim_wrapper.values() for group in wrapper.param_groups]
    return optim_wrapper.param_groups
