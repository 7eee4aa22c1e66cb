"""PreciseStatsHook and checkpoints: mmengine's train loops save in ``after_train_iter`` /
``after_train_epoch`` and validate afterwards, so the hook recomputes there (ahead of CheckpointHook)
whenever a validation follows. A checkpoint saved with a validation then holds the batch averages
that validation used, and testing it reproduces the validation's numbers exactly."""
import pytest
import torch
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.runner import Runner

from norm_plugins.hooks import precise_stats_hook
from norm_plugins.layers import SwitchableNorm
from norm_plugins.runner.checkpoint_safety import mmengine_checkpoint_globals
from runner_helpers import RandomImages, TinySNModel


class MeanOutputMetric(BaseMetric):
    """The mean and mean square of the predictions: they move with every SN running statistic."""

    def process(self, data_batch, data_samples):
        out = data_samples[0].double()
        self.results.append((out.mean().item(), out.square().mean().item()))

    def compute_metrics(self, results):
        return {'mean': sum(r[0] for r in results) / len(results),
                'square': sum(r[1] for r in results) / len(results)}


class EventRecorder(Hook):
    """The order of recomputations, checkpoint saves and validations with the loop's epoch or
    iteration count at the time, the SN statistics each validation starts from and its metrics."""
    priority = 'LOWEST'

    def __init__(self, by_epoch):
        self.by_epoch = by_epoch
        self.runner = None
        self.events, self.val_stats, self.val_metrics = [], [], []

    def count(self):
        return self.runner.epoch if self.by_epoch else self.runner.iter

    def before_save_checkpoint(self, runner, checkpoint):
        self.events.append(('save', self.count()))

    def before_val(self, runner):
        self.events.append(('val', self.count()))
        self.val_stats.append(_sn_stats(runner.model.state_dict()))

    def after_val_epoch(self, runner, metrics=None):
        self.val_metrics.append(dict(metrics))


def _sn_stats(state_dict):
    return {k: v.clone() for k, v in state_dict.items() if k.endswith(('running_mean', 'running_var'))}


def _loader(dataset, batch_size=2):
    return dict(dataset=dataset, sampler=dict(type='DefaultSampler', shuffle=False), batch_size=batch_size,
                num_workers=0, collate_fn=dict(type='default_collate'))


def _runner(work_dir, train_cfg=None, checkpoint=None, load_from=None):
    """Training (``train_cfg``) or, with ``load_from``, testing the tiny SN model."""
    torch.manual_seed(0)
    train, val = RandomImages(length=8, seed=1), RandomImages(length=4, seed=2, offset=2.0)
    loops = {} if load_from else dict(
        train_dataloader=_loader(train), train_cfg=train_cfg, optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        val_dataloader=_loader(val, 1), val_cfg=dict(), val_evaluator=Evaluator([MeanOutputMetric()]),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', **checkpoint)))
    recorder = EventRecorder(by_epoch=bool(train_cfg and train_cfg['by_epoch']))
    runner = Runner(model=TinySNModel(), work_dir=str(work_dir), test_dataloader=_loader(val, 1), test_cfg=dict(),
                    test_evaluator=Evaluator([MeanOutputMetric()]), load_from=load_from,
                    custom_hooks=[dict(type='PreciseStatsHook', num_batches=3), recorder],
                    default_scope='mmengine', experiment_name=f'ckpt_{id(recorder)}', **loops)
    recorder.runner = runner
    return runner, recorder


LOOPS = {
    # iteration-based: validation at 2, 4 and the last iteration 5; checkpoints every 2 and the last
    'iter': (dict(by_epoch=False, max_iters=5, val_interval=2), dict(interval=2, by_epoch=False, save_last=True),
             [2, 4, 5], 'iter_{}.pth'),
    # dynamic intervals: validation from iteration 2, every iteration from 3 on; checkpoints every iteration
    'iter-dynamic': (dict(by_epoch=False, max_iters=4, val_begin=2, val_interval=2, dynamic_intervals=[(3, 1)]),
                     dict(interval=1, by_epoch=False), [2, 3, 4], 'iter_{}.pth'),
    # epoch-based, 4 iterations per epoch: validation every 2 epochs and after the last one
    'epoch': (dict(by_epoch=True, max_epochs=3, val_interval=2), dict(interval=1), [2, 3], 'epoch_{}.pth'),
}


@pytest.mark.parametrize('loop', sorted(LOOPS))
def test_checkpoints_hold_the_statistics_their_validation_used(tmp_path, monkeypatch, loop):
    train_cfg, checkpoint, validated_at, name = LOOPS[loop]
    runner, recorder = _runner(tmp_path / 'train', train_cfg, checkpoint)
    recompute = precise_stats_hook.recompute_batch_stats

    def recording(*args, **kwargs):
        recorder.events.append(('recompute', recorder.count()))
        return recompute(*args, **kwargs)

    monkeypatch.setattr(precise_stats_hook, 'recompute_batch_stats', recording)
    runner.train()

    # One recomputation per validation, in the hook call of the step the validation follows (the
    # counter is one lower there), ahead of that step's checkpoint.
    assert [step for event, step in recorder.events if event == 'val'] == validated_at
    assert sum(event == 'recompute' for event, _ in recorder.events) == len(validated_at)
    for step in validated_at:
        at = recorder.events.index(('val', step))
        assert recorder.events[at - 2:at] == [('recompute', step - 1), ('save', step - 1)], recorder.events
    assert all(layer.momentum == 0.1 for layer in runner.model.modules() if isinstance(layer, SwitchableNorm))

    assert len(recorder.val_stats) == len(recorder.val_metrics) == len(validated_at)
    for step, stats, metrics in zip(validated_at, recorder.val_stats, recorder.val_metrics):
        path = tmp_path / 'train' / name.format(step)
        saved = torch.load(path, map_location='cpu', weights_only=False)['state_dict']
        assert stats and _sn_stats(saved).keys() == stats.keys()
        for key, value in stats.items():
            assert torch.equal(saved[key], value), (step, key)
        assert int(saved['backbone.1.num_batches_tracked']) == 3  # the hook's K, not the training steps
        # Testing the checkpoint gives the validation's numbers exactly.
        tester, _ = _runner(tmp_path / f'test_{step}', load_from=str(path))
        with mmengine_checkpoint_globals():
            assert tester.test() == metrics
