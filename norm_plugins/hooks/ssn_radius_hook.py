"""The SparsestMax radius of every SSN layer from the training progress (the SSN code's schedule),
and the host copy of their frozen state."""
import bisect
import math
import warnings
from typing import List, Optional, Sequence, Tuple

from mmengine.hooks import Hook

from ..layers.sparse_switchable_norm import SparseSwitchableNorm, refresh_frozen
from ..ops.sparsestmax import vertex_distance

# The progress at which the authors' radius (= progress, for K = 3) reaches the vertex distance.
AUTHORS_END = vertex_distance(3)


class SSNRadiusHook(Hook):
    """Before every training iteration, set each SSN layer's radius from the progress
    ``p = iteration / max_iters`` (``runner.iter`` and ``runner.max_iters``, which mmengine counts in
    iteration- and epoch-based loops alike: the authors' ``(epoch * len + i) / (epochs * len)``)::

        radius = f(p) * sqrt((K - 1) / K)          K: the layer's number of normalizers

    so at ``f(p) = 1`` every ratio vector is one-hot. By default ``f(p) = min(1, p / end) ** power``
    with ``end = sqrt(2/3) ~ 0.816`` and ``power = 1``: for K = 3 that is the authors' schedule,
    radius = p (Sparse_SwitchNorm ``train_imagenet.py``), which reaches the vertex at 81.6% of
    training (they let it grow on to 1, which gives the same ratios); layers with K = 2 reach their
    vertex at the same moment. The last 18% of training then finetunes the one-normalizer network.
    ``points`` gives any piecewise-linear schedule instead, e.g. ``[(0, 0), (0.5, 1)]``.

    The radius is a buffer, so checkpoints carry it; on resume the hook recomputes it from the
    resumed iteration anyway. Layers whose logits do not train (``requires_grad=False``, e.g. mmdet's
    ``frozen_stages``) keep their radius.

    Every ``interval`` iterations (and before and after training) the hook refreshes the layers'
    host copy of their frozen state with one device read for all of them
    (:func:`~norm_plugins.layers.sparse_switchable_norm.refresh_frozen`), so that layers whose
    vectors are all one-hot compute only the statistics they need from the next iteration on. It
    logs ``ssn_radius_fraction`` (f(p)) and ``ssn_frozen`` (the fraction of frozen ratio vectors, as of
    the last refresh) with the training scalars.

    Use: ``custom_hooks = [dict(type='SSNRadiusHook')]``, with the SSN optimizer settings
    (``NormAwareOptimWrapperConstructor``'s ``mixture_lr_mult=0.1, mixture_decay_mult=0,
    mixture_clip_grad=dict(max_norm=1)``).

    Args:
        end: progress in (0, 1] at which the radius reaches the vertex distance. With 1 it reaches it
            only after the last iteration (progress (max_iters - 1) / max_iters), so vectors whose
            logits are not already far apart stay free and the trained layers keep mixing.
        power: exponent > 0 of the default schedule.
        points: ``(progress, fraction)`` pairs, progress increasing within [0, 1] and fractions
            non-decreasing within [0, 1] (frozen vectors stay frozen, so the radius never shrinks);
            linear in between, constant outside. Replaces ``end`` and ``power``.
        interval: iterations between refreshes of the host copy.
    """
    priority = 'NORMAL'

    def __init__(self, end: float = AUTHORS_END, power: float = 1.0,
                 points: Optional[Sequence[Tuple[float, float]]] = None, interval: int = 1):
        if _not_number(end) or not 0 < end <= 1:
            raise ValueError(f'SSNRadiusHook: end must be a progress in (0, 1], got {end!r}')
        if _not_number(power) or not 0 < power < float('inf'):
            raise ValueError(f'SSNRadiusHook: power must be a number > 0, got {power!r}')
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'SSNRadiusHook: interval must be a positive int (iterations), got {interval!r}')
        if points is not None:
            if end != AUTHORS_END or power != 1.0:
                raise ValueError('SSNRadiusHook: give either points or end/power, not both')
            points = _check_points(points)
        self.end = end
        self.power = power
        self.points = points
        self.interval = interval
        self._layers: Optional[List[SparseSwitchableNorm]] = None

    def radius_fraction(self, progress: float) -> float:
        """f(p): the radius as a fraction of the vertex distance."""
        progress = min(max(progress, 0.0), 1.0)
        if self.points is None:
            return min(1.0, progress / self.end) ** self.power
        xs = [x for x, _ in self.points]
        i = bisect.bisect_right(xs, progress)
        if i == 0:
            return self.points[0][1]
        if i == len(xs):
            return self.points[-1][1]
        (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        return y0 + (y1 - y0) * (progress - x0) / (x1 - x0)

    def _set(self, runner) -> None:
        fraction = self.radius_fraction(runner.iter / runner.max_iters)
        for layer in self._layers:
            layer.set_radius(fraction * vertex_distance(len(layer.normalizers)), iteration=runner.iter)
        runner.message_hub.update_scalar('train/ssn_radius_fraction', fraction)

    def _refresh(self, runner) -> None:
        refresh_frozen(self._layers)
        choices = [c for layer in self._layers for c in layer._frozen_choices]
        runner.message_hub.update_scalar('train/ssn_frozen', sum(c >= 0 for c in choices) / len(choices))

    def before_train(self, runner) -> None:
        self._layers = [m for m in runner.model.modules()
                        if isinstance(m, SparseSwitchableNorm) and m.mean_weight.requires_grad]
        if not self._layers:
            warnings.warn("SSNRadiusHook: the model has no SSN layer with trainable ratios; the hook does nothing. "
                          "Remove it or use norm_cfg=dict(type='SSN').")
            return
        self._set(runner)
        self._refresh(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._layers is None:
            self.before_train(runner)
        if self._layers:
            self._set(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._layers and self.every_n_train_iters(runner, self.interval):
            self._refresh(runner)

    def after_train(self, runner) -> None:
        if self._layers:
            self._refresh(runner)


def _not_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)


def _check_points(points) -> Tuple[Tuple[float, float], ...]:
    try:
        pairs = tuple((x, y) for x, y in points)
    except (TypeError, ValueError):
        raise ValueError(f'SSNRadiusHook: points must be (progress, fraction) pairs, got {points!r}') from None
    if not pairs or any(_not_number(v) for pair in pairs for v in pair):
        raise ValueError(f'SSNRadiusHook: points must be a non-empty list of (progress, fraction) number pairs, '
                         f'got {points!r}')
    xs, ys = [float(x) for x, _ in pairs], [float(y) for _, y in pairs]
    if any(not 0 <= v <= 1 for v in xs + ys):
        raise ValueError(f'SSNRadiusHook: progress and fraction values must lie in [0, 1], got {points!r}')
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(f'SSNRadiusHook: the progress values of points must increase, got {xs}')
    if any(b < a for a, b in zip(ys, ys[1:])):
        raise ValueError(f'SSNRadiusHook: the fractions of points must not decrease (frozen ratio vectors stay '
                         f'frozen, so the radius never shrinks), got {ys}')
    return tuple(zip(xs, ys))
