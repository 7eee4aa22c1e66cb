"""Batch-average statistics: equal to a direct float64 computation over the same batches, network
frozen, distributed averaging, the hook before validation, the tool."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import norm_plugins  # noqa: F401 - registers layers and hooks
from norm_plugins.analysis import batch_stat_layers, recompute_batch_stats
from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm
from norm_plugins.testing import run_distributed
from runner_helpers import tiny_runner
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


def test_hook_recomputes_before_validation(tmp_path):
    runner = tiny_runner(tmp_path, [dict(type='PreciseStatsHook', num_batches=3)])
    runner.train()
    model = runner.model
    sn1, sn2 = model.backbone[1], model.neck[1]
    # Every training batch is the same constant image: the batch average is that batch's statistics
    # under the final (frozen) weights.
    x = runner.train_dataloader.dataset[0]['inputs'].unsqueeze(0).repeat(2, 1, 1, 1)
    with torch.no_grad():
        h1 = model.backbone[0](x)
        model.eval()
        sn1.train()
        h2 = model.neck[0](model.backbone[2](sn1(h1)))
    torch.testing.assert_close(sn1.running_mean, h1.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sn1.running_var, h1.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sn2.running_mean, h2.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert int(sn1.num_batches_tracked) == 4  # 3 averaged batches, then the forward above
    with pytest.raises(ValueError, match='num_batches must be a positive int'):
        norm_plugins.PreciseStatsHook(num_batches=0)


@pytest.mark.slow
def test_precise_stats_tool_writes_a_checkpoint(tmp_path):
    data = make_tiny_shapes(tmp_path / 'shapes')
    options = tiny_options(MASK_RCNN, data, batch_size=2)
    run_tool(['tools/train.py', str(MASK_RCNN), '--work-dir', str(tmp_path / 'work'), '--cfg-options',
              'train_cfg.max_iters=1', 'default_hooks.checkpoint.interval=1'] + options[1:], cwd=REPO)
    checkpoint = tmp_path / 'work' / 'iter_1.pth'
    out = tmp_path / 'precise.pth'
    result = run_tool(['tools/precise_stats.py', str(MASK_RCNN), str(checkpoint), '--num-batches', '2', '--out',
                       str(out), '--cfg-options'] + options, cwd=REPO)
    assert 'batch-average statistics of 36 layers over 2 batches x 1 process(es)' in result.stdout
    before = torch.load(checkpoint, weights_only=False)['state_dict']
    after = torch.load(out, weights_only=False)
    assert after['meta']['precise_stats']['num_batches'] == 2
    changed = [k for k in after['state_dict'] if not torch.equal(after['state_dict'][k], before[k])]
    assert changed and all(k.endswith(('running_mean', 'running_var', 'num_batches_tracked')) for k in changed)
    missing = run_tool(['tools/precise_stats.py', str(MASK_RCNN), str(tmp_path / 'nope.pth')], cwd=REPO, check=False)
    assert missing.returncode == 2 and 'checkpoint not found' in missing.stderr
