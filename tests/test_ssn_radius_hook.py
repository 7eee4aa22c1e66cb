"""SSNRadiusHook: the radius follows the training progress in iteration- and epoch-based mmengine loops,
vectors freeze at the iteration they become one-hot, and a resumed run continues exactly."""
import math

import pytest
import torch
from mmengine.evaluator import Evaluator
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

import norm_plugins  # noqa: F401 - registers SSN and the hook
from norm_plugins.hooks import SSNRadiusHook
from norm_plugins.hooks.ssn_radius_hook import AUTHORS_END
from norm_plugins.layers import SparseSwitchableNorm
from norm_plugins.layers import sparse_switchable_norm as ssn_module
from norm_plugins.ops.sparsestmax import vertex_distance
from norm_plugins.runner import mmengine_checkpoint_globals
from runner_helpers import CountMetric, RandomImages


class TinySSNModel(BaseModel):
    """conv -> SSN (IN, LN, BN) -> ReLU -> conv -> SSN (IN, LN; the authors' using_bn=False)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), SparseSwitchableNorm(4), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(4, 4, 1), SparseSwitchableNorm(4, normalizers=('in', 'ln')))

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.neck(self.backbone(inputs))
        if mode == 'loss':
            return {'loss': (out - 1).square().mean()}
        return [out] if mode == 'predict' else out


def layers_of(model):
    return [m for m in model.modules() if isinstance(m, SparseSwitchableNorm)]


class StopAfter(Hook):
    """Ends training after ``iters`` iterations, as an interrupted run would (max_iters unchanged)."""

    def __init__(self, iters):
        self.iters = iters

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iters:
            runner.train_loop.stop_training = True


class RadiusProbe(Hook):
    """Records every SSN layer's radius and iteration as the forward will see them."""
    priority = 'LOW'  # after SSNRadiusHook (NORMAL)

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen.append([(float(m.radius), int(m.iteration)) for m in layers_of(runner.model)])


def ssn_runner(work_dir, hooks, by_epoch=False, max_iters=8, resume=False, load_from=None, checkpoint_interval=1000,
               optim_wrapper=None):
    """A Runner over :class:`TinySSNModel` and 8 random images, 2 per batch: 4 iterations an epoch."""
    torch.manual_seed(0)
    loader = dict(dataset=RandomImages(8), sampler=dict(type='DefaultSampler', shuffle=False), batch_size=2,
                  num_workers=0, collate_fn=dict(type='default_collate'))
    train_cfg = (dict(by_epoch=True, max_epochs=max_iters // 4, val_interval=1000) if by_epoch else
                 dict(by_epoch=False, max_iters=max_iters, val_interval=1000))
    return Runner(model=TinySSNModel(), work_dir=str(work_dir), train_dataloader=loader, val_dataloader=loader,
                  val_evaluator=Evaluator([CountMetric()]), train_cfg=train_cfg, val_cfg=dict(),
                  optim_wrapper=optim_wrapper or dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
                  custom_hooks=hooks, resume=resume, load_from=load_from,
                  default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=checkpoint_interval,
                                                     by_epoch=by_epoch)),
                  default_scope='mmengine', experiment_name=f'ssn_{id(hooks)}')


def test_default_schedule_is_the_authors_linear_radius():
    hook = SSNRadiusHook()
    assert AUTHORS_END == pytest.approx(math.sqrt(2 / 3))
    for p in (0.0, 0.1, 0.5, 0.8):
        # K = 3: radius = progress (the authors' rad), up to the vertex.
        assert hook.radius_fraction(p) * vertex_distance(3) == pytest.approx(p)
    assert hook.radius_fraction(AUTHORS_END) == 1.0 and hook.radius_fraction(0.95) == 1.0
    assert SSNRadiusHook(end=0.5, power=2.0).radius_fraction(0.25) == pytest.approx(0.25)
    points = SSNRadiusHook(points=[(0.2, 0.0), (0.6, 0.8), (0.8, 1.0)])
    assert [points.radius_fraction(p) for p in (0.0, 0.2, 0.4, 0.7, 0.9)] == pytest.approx([0, 0, 0.4, 0.9, 1.0])


@pytest.mark.parametrize('kwargs, match', [
    (dict(end=0.0), 'end must be a progress'), (dict(end=1.5), 'end must be a progress'),
    (dict(power=0), 'power must be a number > 0'), (dict(interval=0), 'interval must be a positive int'),
    (dict(points=[(0, 0)], end=0.5), 'either points or end/power'),
    (dict(points=[]), 'non-empty list'), (dict(points=[(0, 'a')]), 'non-empty list'),
    (dict(points=[0.5]), 'pairs'), (dict(points=[(0, 0), (1.2, 1)]), 'lie in \\[0, 1\\]'),
    (dict(points=[(0.5, 0), (0.5, 1)]), 'must increase'), (dict(points=[(0, 0.5), (1, 0.2)]), 'never shrinks'),
])
def test_bad_options_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSNRadiusHook(**kwargs)


@pytest.mark.parametrize('by_epoch', [False, True], ids=['iter-based', 'epoch-based'])
def test_radius_follows_the_progress_and_vectors_freeze_on_time(tmp_path, by_epoch):
    probe = RadiusProbe()
    runner = ssn_runner(tmp_path, [dict(type='SSNRadiusHook', end=0.5), probe], by_epoch=by_epoch)
    runner.train()
    assert runner.max_iters == 8
    layers = layers_of(runner.model)
    assert len(probe.seen) == 8
    for i, seen in enumerate(probe.seen):
        fraction = min(1.0, i / 8 / 0.5)
        for layer, (radius, iteration) in zip(layers, seen):
            assert radius == pytest.approx(fraction * vertex_distance(len(layer.normalizers)), rel=1e-6)
            assert iteration == i
    # From iteration 4 on (progress 0.5) every vector is one-hot: all froze by then.
    for layer in layers:
        fixed_at = torch.cat([layer.mean_fixed_at, layer.var_fixed_at]).tolist()
        assert all(0 <= at <= 4 for at in fixed_at), fixed_at
        assert layer._all_frozen, 'the hook refreshed the host copy'
    assert runner.message_hub.get_scalar('train/ssn_radius_fraction').current() == 1.0
    assert runner.message_hub.get_scalar('train/ssn_frozen').current() == 1.0


def test_refresh_every_interval_with_one_read(tmp_path, monkeypatch):
    calls = []
    refresh = ssn_module.refresh_frozen
    monkeypatch.setattr('norm_plugins.hooks.ssn_radius_hook.refresh_frozen',
                        lambda layers: calls.append(len(layers)) or refresh(layers))
    ssn_runner(tmp_path, [dict(type='SSNRadiusHook', interval=3)]).train()
    assert calls == [2] * 4  # before training, after iterations 3 and 6, after training


def test_resume_continues_exactly(tmp_path):
    """Four iterations, a checkpoint, a resumed run to eight: the frozen choices and their
    iterations, the radius and every parameter equal those of eight uninterrupted iterations. The
    radius is recomputed from the resumed iteration (here the checkpoint's is overwritten with 0)."""
    hooks = lambda: [dict(type='SSNRadiusHook', end=0.35)]  # noqa: E731 - the vertex at iteration 3
    straight = ssn_runner(tmp_path / 'straight', hooks())
    straight.train()
    first = ssn_runner(tmp_path / 'first', hooks() + [StopAfter(4)], checkpoint_interval=4)
    first.train()
    path = tmp_path / 'first' / 'iter_4.pth'
    with mmengine_checkpoint_globals():
        checkpoint = torch.load(path)
    frozen_at = [t for n, t in checkpoint['state_dict'].items() if n.endswith('fixed_at')]
    assert frozen_at and all(t.tolist() == [3] or 0 <= int(t) < 3 for t in frozen_at)
    for name in checkpoint['state_dict']:
        if name.endswith('radius'):
            checkpoint['state_dict'][name] = torch.tensor(0.0)
    torch.save(checkpoint, path)
    probe = RadiusProbe()
    resumed = ssn_runner(tmp_path / 'first', hooks() + [probe], resume=True)
    with mmengine_checkpoint_globals():
        resumed.train()
    assert [radius for radius, _ in probe.seen[0]] == pytest.approx([vertex_distance(3), vertex_distance(2)])
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_layers_with_frozen_logits_keep_their_radius(tmp_path):
    runner = ssn_runner(tmp_path, [dict(type='SSNRadiusHook')], max_iters=2)
    frozen = runner.model.backbone[1]
    frozen.set_radius(0.25)
    for p in frozen.parameters():
        p.requires_grad_(False)
    runner.train()
    assert float(frozen.radius) == 0.25 and float(runner.model.neck[1].radius) > 0


def test_warns_without_trainable_ssn(tmp_path):
    from runner_helpers import tiny_runner
    runner = tiny_runner(tmp_path, [dict(type='SSNRadiusHook')], max_iters=1)
    with pytest.warns(UserWarning, match='no SSN layer with trainable ratios'):
        runner.train()
