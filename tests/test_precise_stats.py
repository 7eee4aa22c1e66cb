"""Batch-average statistics: equal to a direct float64 computation over the same batches, network
frozen, layers in eval kept, distributed averaging, the hook before validation and test (frozen
stages of an mmdet ResNet kept), the tool."""
import argparse
import copy
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.config import DictAction
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from torch import nn

import norm_plugins  # noqa: F401 - registers layers and hooks
from norm_plugins.analysis import batch_stat_layers, recompute_batch_stats
from norm_plugins.analysis.model_io import build_model, load_config
from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm
from norm_plugins.testing import run_distributed
from runner_helpers import RandomImages, tiny_runner
from tools_helpers import MASK_RCNN, REPO, make_tiny_shapes, run_tool, tiny_options


def _model():
    torch.manual_seed(0)
    sn = SwitchableNorm(4)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
        sn.var_weight.copy_(torch.tensor([-0.1, 0.4, 0.2]))
        sn.weight.uniform_(0.5, 1.5)
        sn.bias.normal_()
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), sn, nn.ReLU(), nn.Conv2d(4, 4, 1),
                          BatchChannelNorm(4, num_groups=2), nn.Conv2d(4, 4, 1),
                          BatchChannelNorm(4, num_groups=2, estimate=True), nn.BatchNorm2d(4), nn.Dropout(0.5))
    return model.double()


def _sn_train_output(sn, h):
    """SN (Eq. 2-5) with batch statistics, float64, biased variances."""
    mean_ratio, var_ratio = F.softmax(sn.mean_weight, 0), F.softmax(sn.var_weight, 0)
    mu_in, var_in = h.mean((2, 3), keepdim=True), h.var((2, 3), unbiased=False, keepdim=True)
    mu_ln = h.mean((1, 2, 3), keepdim=True)
    var_ln = (h.square()).mean((1, 2, 3), keepdim=True) - mu_ln.square()
    mu_bn, var_bn = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    mean = mean_ratio[0] * mu_in + mean_ratio[1] * mu_ln + mean_ratio[2] * mu_bn
    var = var_ratio[0] * var_in + var_ratio[1] * var_ln + var_ratio[2] * var_bn
    return (h - mean) / (var + sn.eps).sqrt() * sn.weight.view(1, -1, 1, 1) + sn.bias.view(1, -1, 1, 1)


def test_batch_average_equals_direct_computation_and_network_stays_frozen():
    model = _model()
    model.train()
    sn, bcn, micro, bn = model[1], model[4], model[6], model[7]
    with torch.no_grad():
        bn.running_mean.normal_()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
               for k in range(4)]

    assert recompute_batch_stats(model, iter(batches + batches), num_batches=4) == 2

    with torch.no_grad():
        sn_stats, bcn_stats = [], []
        for x in batches:
            h1 = model[0](x)
            sn_stats.append((h1.mean((0, 2, 3)), h1.var((0, 2, 3), unbiased=False)))
            h2 = model[3](F.relu(_sn_train_output(sn, h1)))
            bcn_stats.append((h2.mean((0, 2, 3)), h2.var((0, 2, 3), unbiased=True)))  # BCN stores it unbiased
    for layer, stats in ((sn, sn_stats), (bcn, bcn_stats)):
        expected_mean, expected_var = (torch.stack([s[i] for s in stats]).mean(0) for i in (0, 1))
        torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-12, atol=1e-12)
        assert int(layer.num_batches_tracked) == 4 and layer.momentum == 0.1
    state = model.state_dict()
    untouched = [k for k in state if not k.startswith(('1.running', '1.num_batches', '4.running', '4.num_batches'))]
    for key in untouched:  # parameters, BatchNorm statistics, micro-batch estimates
        assert torch.equal(state[key], frozen[key]), key
    assert all(m.training for m in model.modules())
    assert batch_stat_layers(model) == [sn, bcn] and micro not in batch_stat_layers(model)


def test_layers_in_eval_keep_their_statistics():
    model = _model()
    model.train()
    sn, bcn = model[1], model[4]
    sn.eval()
    with torch.no_grad():
        sn.running_mean.normal_()
    kept = {k: v.clone() for k, v in sn.state_dict().items()}
    batches = [torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
               for k in range(2)]
    assert recompute_batch_stats(model, batches, num_batches=2) == 1
    assert all(torch.equal(v, kept[k]) for k, v in sn.state_dict().items())
    assert int(bcn.num_batches_tracked) == 2 and not sn.training and bcn.training
    with torch.no_grad():  # BCN's input came through SN normalizing with its kept statistics
        h = [model[3](F.relu(sn(model[0](x)))) for x in batches]
    torch.testing.assert_close(bcn.running_mean, torch.stack([x.mean((0, 2, 3)) for x in h]).mean(0),
                               rtol=1e-12, atol=1e-12)
    model.eval()
    with pytest.raises(ValueError, match='in eval mode .* call model.train'):
        recompute_batch_stats(model, batches, num_batches=2)


def test_errors_name_the_problem():
    model = _model()
    with pytest.raises(ValueError, match='asked for 3 batches but the data loader gave 2'):
        recompute_batch_stats(model, [torch.randn(2, 2, 4, 4, dtype=torch.float64)] * 2, 3)
    assert model[1].momentum == 0.1 and model.training  # restored after the failure
    with pytest.raises(ValueError, match='no SN, SyncSN or large-batch BCN'):
        recompute_batch_stats(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)), [torch.randn(1, 1, 2, 2)], 1)
    with pytest.raises(ValueError, match='num_batches must be a positive int'):
        recompute_batch_stats(model, [], 0)


def _distributed_average(rank, world_size):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1).double()
    local, synced = nn.Sequential(conv, SwitchableNorm(3)).double(), nn.Sequential(conv, SyncSwitchableNorm(3)).double()
    # Unequal batches: rank r holds r + 2 images per step.
    batches = {(r, k): torch.randn(r + 2, 2, 3, 3, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(10 * r + k))
               for r in range(world_size) for k in range(3)}
    mine = [batches[rank, k] for k in range(3)]
    recompute_batch_stats(local, mine, 3)
    recompute_batch_stats(synced, mine, 3)
    with torch.no_grad():
        per_rank = [conv(batches[r, k]) for r in range(world_size) for k in range(3)]
        expected_mean = torch.stack([h.mean((0, 2, 3)) for h in per_rank]).mean(0)
        expected_var = torch.stack([h.var((0, 2, 3), unbiased=False) for h in per_rank]).mean(0)
        global_steps = [torch.cat([conv(batches[r, k]) for r in range(world_size)]) for k in range(3)]
        sync_mean = torch.stack([h.mean((0, 2, 3)) for h in global_steps]).mean(0)
        sync_var = torch.stack([h.var((0, 2, 3), unbiased=False) for h in global_steps]).mean(0)
    torch.testing.assert_close(local[1].running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local[1].running_var, expected_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(synced[1].running_mean, sync_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(synced[1].running_var, sync_var, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(sync_mean, expected_mean)  # the two protocols differ with unequal batches
    assert dist.get_world_size() == world_size


@pytest.mark.slow
def test_distributed_average_over_ranks_for_sn_and_syncsn():
    run_distributed(_distributed_average, 2)


class _Recorder(Hook):
    """The training batches in the order the loop used them, and a float64 copy of the model at each
    validation, taken after PreciseStatsHook (lower priority)."""
    priority = 'NORMAL'

    def __init__(self):
        self.train_inputs, self.at_validation = [], []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.train_inputs.append(data_batch['inputs'].clone())

    def before_val(self, runner):
        self.at_validation.append(copy.deepcopy(runner.model).double())


def _tiny_model_average(model, batches):
    """Float64 average over ``batches`` of the batch statistics of TinySNModel's two SN layers."""
    sn1, sn2 = model.backbone[1], model.neck[1]
    stats = {sn1: [], sn2: []}
    with torch.no_grad():
        for x in batches:
            h1 = model.backbone[0](x.double())
            h2 = model.neck[0](F.relu(_sn_train_output(sn1, h1)))
            for layer, h in ((sn1, h1), (sn2, h2)):
                stats[layer].append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)))
    return {layer: tuple(torch.stack([s[i] for s in values]).mean(0) for i in (0, 1))
            for layer, values in stats.items()}


def test_hook_averages_the_next_training_batches_and_keeps_the_training_order(tmp_path):
    train, val = RandomImages(length=12, seed=1), RandomImages(length=4, seed=2, offset=3.0)
    recorder = _Recorder()
    runner = tiny_runner(tmp_path, [dict(type='PreciseStatsHook', num_batches=3), recorder], max_iters=4,
                         val_interval=2, train_dataset=train, val_dataset=val)
    runner.train()
    # The training loop saw batches 0..3 in order: the hook draws from its own loader.
    assert len(recorder.train_inputs) == 4
    for i, inputs in enumerate(recorder.train_inputs):
        assert torch.equal(inputs, train.images[2 * i:2 * i + 2]), i
    # Validation j averaged training batches 3j..3j+2 (the next K of the hook's pass over the
    # training data) under the weights of that moment.
    assert len(recorder.at_validation) == 2
    averages = []
    for j, model in enumerate(recorder.at_validation):
        batches = [train.images[2 * b:2 * b + 2] for b in range(3 * j, 3 * j + 3)]
        for layer, (mean, var) in _tiny_model_average(model, batches).items():
            torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
            assert int(layer.num_batches_tracked) == 3 and layer.momentum == 0.1
            averages.append(mean)
    assert not torch.allclose(averages[0], averages[2], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match='num_batches must be a positive int'):
        norm_plugins.PreciseStatsHook(num_batches=0)


class _FrozenStemResNet(BaseModel):
    """mmdet's ResNet-18 (narrow) with SN and ``frozen_stages=1``: stem and layer1 stay in eval."""

    def __init__(self):
        super().__init__()
        from mmdet.models.backbones import ResNet
        self.backbone = ResNet(depth=18, stem_channels=8, base_channels=8, frozen_stages=1,
                               norm_cfg=dict(type='SN'), norm_eval=False)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        outs = self.backbone(inputs)
        if mode == 'loss':
            return {'loss': sum(out.square().mean() for out in outs)}
        return [outs[-1]] if mode == 'predict' else outs


@pytest.mark.parametrize('phase', ['val', 'test'])
def test_frozen_stages_keep_their_statistics(tmp_path, phase):
    model = _FrozenStemResNet()
    frozen = [m for name, m in model.backbone.named_modules()
              if isinstance(m, SwitchableNorm) and (name == 'sn1' or name.startswith('layer1.'))]
    trained = [m for m in model.backbone.modules() if isinstance(m, SwitchableNorm) and m not in frozen]
    assert len(frozen) == 5 and len(trained) == 15
    with torch.no_grad():  # "pretrained" statistics
        for layer in frozen:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
            layer.num_batches_tracked.fill_(1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = RandomImages(length=8, size=(3, 32, 32), seed=4)
    hook = dict(type='PreciseStatsHook', num_batches=3, on_test=phase == 'test')
    runner = tiny_runner(tmp_path, [hook], max_iters=2, val_interval=2 if phase == 'val' else 100, model=model,
                         train_dataset=data, val_dataset=data, with_test=phase == 'test')
    runner.train()
    if phase == 'test':
        runner.test()
    for name, layer in model.backbone.named_modules():
        if layer in frozen:
            for key in ('running_mean', 'running_var', 'num_batches_tracked'):
                assert torch.equal(getattr(layer, key), before[f'backbone.{name}.{key}']), (name, key)
    # The others were recomputed over the hook's 3 batches (reset, then 3 updates; training made 2).
    assert all(int(layer.num_batches_tracked) == 3 for layer in trained)


def _backbone_neck_average(cfg_options, checkpoint, num_batches):
    """Float64 average of the batch statistics every backbone and neck SN in training mode sees over
    the first ``num_batches`` training batches (the heads' depend on random RoI sampling)."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg = load_config(str(MASK_RCNN), parser.parse_args(['--cfg-options'] + cfg_options).cfg_options)
    model = build_model(cfg, str(checkpoint)).double().train()
    stats = {}

    def record(name):
        def hook(module, args):
            h = args[0].double()
            stats.setdefault(name, []).append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, SwitchableNorm) and module.training and name.startswith(('backbone.', 'neck.')):
            module.register_forward_pre_hook(record(name))
    loader_cfg = dict(copy.deepcopy(cfg.train_dataloader), persistent_workers=False)
    with DefaultScope.overwrite_default_scope('mmdet'), torch.no_grad():
        loader = Runner.build_dataloader(loader_cfg, seed=0)
        for batch in itertools.islice(loader, num_batches):
            model.extract_feat(model.data_preprocessor(batch, True)['inputs'].double())
    assert all(len(values) == num_batches for values in stats.values())
    return {name: tuple(torch.stack([s[i] for s in values]).mean(0) for i in (0, 1))
            for name, values in stats.items()}


@pytest.mark.slow
def test_precise_stats_tool_writes_the_batch_average(tmp_path):
    data = make_tiny_shapes(tmp_path / 'shapes')
    options = tiny_options(MASK_RCNN, data, batch_size=2)
    run_tool(['tools/train.py', str(MASK_RCNN), '--work-dir', str(tmp_path / 'work'), '--cfg-options',
              'train_cfg.max_iters=1', 'default_hooks.checkpoint.interval=1'] + options[1:], cwd=REPO)
    checkpoint = tmp_path / 'work' / 'iter_1.pth'
    out = tmp_path / 'precise.pth'
    # Batches the test can feed again (no flip, no shuffle), and a frozen stem and layer1.
    options += ['train_dataloader.dataset.pipeline.3.prob=0.0', 'train_dataloader.sampler.shuffle=False',
                'model.backbone.frozen_stages=1']
    result = run_tool(['tools/precise_stats.py', str(MASK_RCNN), str(checkpoint), '--num-batches', '2', '--out',
                       str(out), '--cfg-options'] + options, cwd=REPO)
    assert 'batch-average statistics of 31 layers over 2 batches x 1 process(es)' in result.stdout
    before = torch.load(checkpoint, weights_only=False)['state_dict']
    after = torch.load(out, weights_only=False)
    assert after['meta']['precise_stats']['num_batches'] == 2
    state = after['state_dict']
    changed = [k for k in state if not torch.equal(state[k], before[k])]
    assert changed and all(k.endswith(('running_mean', 'running_var', 'num_batches_tracked')) for k in changed)
    assert not [k for k in changed if k.startswith(('backbone.sn1.', 'backbone.layer1.'))]  # frozen
    expected = _backbone_neck_average(options, checkpoint, 2)
    assert len(expected) == 36 - 5 - 8  # all but the 5 frozen ones and the 8 of the RoI heads
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(state[f'{name}.running_mean'].double(), mean, rtol=2e-4, atol=1e-5)
        torch.testing.assert_close(state[f'{name}.running_var'].double(), var, rtol=2e-4, atol=1e-5)
        assert int(state[f'{name}.num_batches_tracked']) == 2
    missing = run_tool(['tools/precise_stats.py', str(MASK_RCNN), str(tmp_path / 'nope.pth')], cwd=REPO, check=False)
    assert missing.returncode == 2 and 'checkpoint not found' in missing.stderr
