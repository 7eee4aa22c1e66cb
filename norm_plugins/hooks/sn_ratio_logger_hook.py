"""Logs the average SN ratios of every network part during training (the papers' learning-dynamics
plots, "Do Normalization Layers Need to Be Distinct" Fig. 3)."""
import warnings

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..analysis.ratio_logs import ratio_scalars


class SNRatioLoggerHook(Hook):
    """Every ``interval`` training iterations (and before the first), write the average mean and
    variance ratios of each backbone stage, the neck and each head to the runner's visualizer, i.e.
    to every configured backend (``LocalVisBackend``'s ``vis_data/scalars.json``, TensorBoard,
    WandB...). ``tools/analysis/plot_sn_ratio_dynamics.py WORK_DIR`` plots them.

    Use: ``custom_hooks = [dict(type='SNRatioLoggerHook', interval=50)]``.
    """
    priority = 'LOW'

    def __init__(self, interval: int = 50):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'SNRatioLoggerHook: interval must be a positive int (iterations), got {interval!r}')
        self.interval = interval

    def _log(self, runner, step: int) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        scalars = ratio_scalars(model)
        if scalars:
            runner.visualizer.add_scalars(scalars, step=step)

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not ratio_scalars(model):
            warnings.warn("SNRatioLoggerHook: the model has no SN layer; nothing will be logged. Remove the hook "
                          "or use norm_cfg=dict(type='SN').")
            return
        self._log(runner, runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval):
            self._log(runner, runner.iter + 1)
