"""Batch-average statistics before every validation (SN paper Sec. 3, "Inference")."""
import bisect
import copy
from contextlib import contextmanager
from typing import Iterator, Optional

from mmengine.hooks import Hook
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from ..analysis.precise_stats import FORWARD_MODES, recompute_batch_stats


class PreciseStatsHook(Hook):
    """Before each validation (and with ``on_test=True`` each test), recompute the running statistics
    of SN, SyncSN and large-batch BCN as the average over ``num_batches`` training batches with the
    network frozen (:func:`~norm_plugins.analysis.recompute_batch_stats`), so validation uses batch
    averages instead of moving averages. Training then continues its moving averages from them.

    mmengine's train loops validate after the ``after_train_iter``/``after_train_epoch`` hooks, where
    ``CheckpointHook`` (priority VERY_LOW) saves. So when the loop (mmengine's epoch- or
    iteration-based one) will validate after this iteration or epoch, the hook recomputes in that
    hook call, ahead of ``CheckpointHook``, and validation reuses the result: the checkpoint saved at
    a validation holds the statistics that validation used, and ``tools/test.py`` on it reproduces
    the validation's numbers. Checkpoints saved where no validation follows hold moving averages;
    ``tools/precise_stats.py`` turns any checkpoint into a batch-average one.

    Only layers in training mode are recomputed: before validation, those the training loop left
    in training mode; before a test, those that ``model.train()`` puts in training mode. Layers
    the model keeps in eval (mmdet/mmseg ``frozen_stages``, ``norm_eval=True``) keep their
    statistics, e.g. the pretrained ones of a frozen stem and first stage.

    Batches come from a separate loader built from the config's ``train_dataloader`` (without
    persistent workers), so the training loop's own data order is untouched; successive validations
    continue through it. Distributed: every rank uses its own shard, the averages are averaged over
    ranks. Use: ``custom_hooks = [dict(type='PreciseStatsHook', num_batches=200)]``.

    Args:
        num_batches: K, the number of training batches averaged (the authors use 200).
        mode: forward mode, ``'loss'`` (the batch exactly as in training) or ``'tensor'``.
        on_test: also recompute before ``runner.test()``.
        dataloader: a dataloader config to draw batches from instead of ``train_dataloader``.
    """
    priority = 'ABOVE_NORMAL'

    def __init__(self, num_batches: int = 200, mode: str = 'loss', on_test: bool = False,
                 dataloader: Optional[dict] = None):
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f'PreciseStatsHook: num_batches must be a positive int, got {num_batches!r}')
        if mode not in FORWARD_MODES:
            raise ValueError(f'PreciseStatsHook: mode must be one of {FORWARD_MODES}, got {mode!r}')
        self.num_batches = num_batches
        self.mode = mode
        self.on_test = on_test
        self.dataloader_cfg = dataloader
        self._batches: Optional[Iterator] = None
        self._fresh = False  # recomputed since the last training step: the next validation reuses it

    def _batch_iterator(self, runner) -> Iterator:
        if self._batches is None:
            self._batches = _endless(self._loader(runner))
        return self._batches

    def _loader(self, runner):
        cfg = self.dataloader_cfg or runner.cfg.get('train_dataloader')
        if cfg is not None:
            cfg = copy.deepcopy(cfg)
            cfg['persistent_workers'] = False
            return runner.build_dataloader(cfg, seed=runner.seed)
        # A Runner built from arguments, not a config: its own train loader, when iterating it anew
        # leaves the training loop's iterator alone (no persistent workers).
        loader = runner.train_dataloader
        if getattr(loader, 'persistent_workers', False):
            raise ValueError('PreciseStatsHook: the train dataloader keeps persistent workers, which a second '
                             'iterator would reset; pass dataloader=dict(...) to the hook')
        return loader

    def _recompute(self, runner) -> None:
        count = recompute_batch_stats(runner.model, self._batch_iterator(runner), self.num_batches, self.mode)
        runner.logger.info(f'PreciseStatsHook: batch-average statistics of {count} layers over '
                           f'{self.num_batches} training batches per rank')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._fresh = False

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if isinstance(runner.train_loop, IterBasedTrainLoop) and _validates_at(runner, runner.iter + 1):
            self._recompute(runner)
            self._fresh = True

    def after_train_epoch(self, runner) -> None:
        if isinstance(runner.train_loop, EpochBasedTrainLoop) and _validates_at(runner, runner.epoch + 1):
            self._recompute(runner)
            self._fresh = True

    def before_val(self, runner) -> None:
        if not self._fresh:
            self._recompute(runner)

    def before_test(self, runner) -> None:
        if self.on_test:
            # A test starts in whatever mode the last loop left the model (eval after a validation):
            # recompute the layers that training would update, then restore every flag.
            with _train_mode(runner.model):
                self._recompute(runner)


def _validates_at(runner, step: int) -> bool:
    """Whether mmengine 0.10's train loop validates once its epoch (epoch-based) or iteration
    (iteration-based) count reaches ``step``: the loops' own test, including dynamic intervals."""
    loop = runner.train_loop
    if runner.val_loop is None or step < loop.val_begin:
        return False
    interval = loop.dynamic_intervals[bisect.bisect(loop.dynamic_milestones, step + 1) - 1]
    last = loop.max_epochs if isinstance(loop, EpochBasedTrainLoop) else loop.max_iters
    return step % interval == 0 or step == last


@contextmanager
def _train_mode(model) -> Iterator[None]:
    """``model.train()`` (which keeps the model's frozen parts in eval) until the block ends."""
    training = {module: module.training for module in model.modules()}
    model.train()
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag


def _endless(loader) -> Iterator:
    """Batches of ``loader`` without end, advancing the sampler's epoch at each pass."""
    epoch = 0
    while True:
        sampler = getattr(loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1
