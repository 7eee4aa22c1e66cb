"""The batch-size study (tools/study_batch_size.py): the tiny setting end to end as a user runs it,
with well-formed CSV, Markdown and PNG outputs (numbers not asserted, only their ranges and
invariants); the pieces it is made of (normalizer layers through mmcv's registry, the image order
shared by all batch sizes, the schedule, the summary statistics, the tables) and its input errors."""
import csv
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from norm_plugins.layers import (BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SyncSwitchableNorm,
                                 WSConv2d)
from norm_plugins.ops.sparsestmax import vertex_distance
from norm_plugins.study.classification import (ClassificationSetting, DigitsNet, image_order, learning_rate,
                                               load_digits, mean_sn_ratios, ssn_freezing, train_one)
from norm_plugins.study.cli import main
from norm_plugins.study.normalizers import NORMALIZERS, SN_FAMILY, layer_cfgs
from norm_plugins.study.report import SSN_COLUMNS, freezing_table
from norm_plugins.study.report import metric_table, summarize
from tools_helpers import REPO, tool_env

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    out = tmp_path / 'study'
    result = subprocess.run([sys.executable, 'tools/study_batch_size.py', '--tiny', '--out', str(out)], cwd=REPO,
                            env=tool_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    runs = _read_csv(out / 'classification_runs.csv')
    assert [(r['normalizer'], int(r['images_per_process'])) for r in runs] == [
        (n, b) for n in NORMALIZERS for b in (1, 2)]
    for r in runs:
        assert int(r['processes']) == 2 and int(r['images']) == 8
        assert int(r['steps']) == 8 // (2 * int(r['images_per_process']))
        assert 0 <= float(r['accuracy']) <= 100
        assert math.isfinite(float(r['final_train_loss']))
        if r['normalizer'] in SN_FAMILY:
            for kind in ('mean', 'var'):
                assert sum(float(r[f'sn_{kind}_{k}']) for k in ('in', 'ln', 'bn')) == pytest.approx(1, abs=1e-5)
        else:
            assert r['sn_mean_bn'] == ''
        _check_freezing(r, 4)  # widths (8, 16): two stages of two layers
    detection = _read_csv(out / 'detection_runs.csv')
    assert [r['normalizer'] for r in detection] == ['BN', 'SN', 'SSN']
    for r in detection:
        assert int(r['images_per_process']) == 2
        assert 0 <= float(r['bbox_mAP']) <= 100 and 0 <= float(r['bbox_mAP_50']) <= 100
        # ResNet-18 (20 norms), FPN (8) and the 4conv1fc head (4)
        _check_freezing(r, 32)

    summary = _read_csv(out / 'summary.csv')
    accuracy = {(s['normalizer'], int(s['images_per_process'])): s for s in summary
                if s['task'] == 'classification' and s['metric'] == 'accuracy'}
    assert set(accuracy) == {(n, b) for n in NORMALIZERS for b in (1, 2)}
    for (n, b), s in accuracy.items():
        run = next(r for r in runs if r['normalizer'] == n and int(r['images_per_process']) == b)
        assert float(s['mean']) == pytest.approx(float(run['accuracy']), abs=1e-4)
        assert float(s['std']) == 0 and int(s['n']) == 1

    markdown = (out / 'results.md').read_text()
    assert 'python tools/study_batch_size.py --tiny' in markdown
    for heading in ('## Classification: digits test accuracy', '## SN importance ratios',
                    '## SSN: frozen ratio vectors', '## Detection from scratch: COCO box mAP',
                    '## Detection: SSN frozen ratio vectors'):
        assert heading in markdown
    for n in NORMALIZERS:
        assert f'| {n} |' in markdown
    for image in ('accuracy_vs_batch.png', 'sn_ratios_vs_batch.png'):
        assert f'({image})' in markdown
        data = (out / image).read_bytes()
        assert data.startswith(PNG_MAGIC)
        import matplotlib.image
        pixels = matplotlib.image.imread(str(out / image))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0


def _check_freezing(row, vectors):
    """SSN rows: frozen counts within the model's ratio vectors; the radius a valid one. Others: empty."""
    if row['normalizer'] != 'SSN':
        assert all(row[c] == '' for c in SSN_COLUMNS)
        return
    assert int(float(row['ssn_vectors'])) == vectors
    for kind in ('mean', 'var'):
        assert 0 <= sum(int(float(row[f'ssn_frozen_{kind}_{k}'])) for k in ('in', 'ln', 'bn')) <= vectors
    assert 0 <= float(row['ssn_radius']) <= vertex_distance(3) + 1e-6


@pytest.mark.parametrize('name,norm_type,conv_type', [
    ('BN', torch.nn.BatchNorm2d, torch.nn.Conv2d), ('GN', torch.nn.GroupNorm, torch.nn.Conv2d),
    ('GN+WS', torch.nn.GroupNorm, WSConv2d), ('SN', SwitchableNorm, torch.nn.Conv2d),
    ('SyncSN', SyncSwitchableNorm, torch.nn.Conv2d), ('SN-G2', SwitchableNorm, torch.nn.Conv2d),
    ('SSN', SparseSwitchableNorm, torch.nn.Conv2d), ('BCN+WS', BatchChannelNorm, WSConv2d)])
def test_network_builds_each_normalizer_through_the_registry(name, norm_type, conv_type):
    net = DigitsNet((8, 16), **layer_cfgs(name, 4))
    convs = [m.conv for m in net.features]
    norms = [m.norm for m in net.features]
    assert len(norms) == 4
    assert all(type(c) is conv_type for c in convs)
    assert all(type(n) is norm_type for n in norms)
    assert all(c.bias is None for c in convs)
    if name == 'BCN+WS':
        assert all(n.estimate for n in norms)
    if norm_type is SwitchableNorm:
        assert all(n.ratio_groups == (2 if name == 'SN-G2' else 1) for n in norms)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_unknown_normalizer_is_named():
    with pytest.raises(ValueError, match="unknown normalizer 'LN'.*BN, GN"):
        layer_cfgs('LN', 8)


def test_digits_split_and_standardization():
    data = load_digits(16)
    assert data['train_x'].shape == (1797 - 447, 1, 16, 16) and data['test_x'].shape == (447, 1, 16, 16)
    assert float(data['train_x'].mean()) == pytest.approx(0, abs=1e-5)
    assert float(data['train_x'].std()) == pytest.approx(1, abs=1e-4)
    assert set(data['test_y'].tolist()) == set(range(10))


def test_every_batch_size_sees_the_same_images_in_the_same_order():
    order = image_order(3, 100, 256)
    assert len(order) == 256
    # Whole epochs are permutations of the training set.
    assert sorted(order[:100]) == list(range(100)) and sorted(order[100:200]) == list(range(100))
    np.testing.assert_array_equal(order[:64], image_order(3, 100, 64))
    assert not np.array_equal(order, image_order(4, 100, 256))


def test_learning_rate_warmup_and_cosine():
    steps, peak = 200, 0.5
    rates = [learning_rate(s, steps, peak) for s in range(steps)]
    warmup = int(0.05 * steps)
    assert rates[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
    assert rates[warmup] == pytest.approx(peak)
    assert rates[warmup + (steps - warmup) // 2] == pytest.approx(peak / 2)
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))


def test_mean_sn_ratios_average_the_layers():
    net = DigitsNet((8,), **layer_cfgs('SN', 4))
    first, second = [m.norm for m in net.features]
    with torch.no_grad():
        first.mean_weight.copy_(torch.tensor([0.0, 0.0, math.log(2.0)]))  # softmax 1/4, 1/4, 1/2
    ratios = mean_sn_ratios(net)
    assert ratios['sn_mean_bn'] == pytest.approx((0.5 + 1 / 3) / 2)
    assert ratios['sn_mean_in'] == pytest.approx((0.25 + 1 / 3) / 2)
    assert ratios['sn_var_bn'] == pytest.approx(1 / 3)
    assert mean_sn_ratios(DigitsNet((8,), **layer_cfgs('GN', 4))) == {}


def test_ratio_averages_of_group_sn_and_ssn_freezing_counts():
    net = DigitsNet((8,), **layer_cfgs('SN-G2', 4))
    first, second = [m.norm for m in net.features]
    with torch.no_grad():
        first.mean_weight.copy_(torch.tensor([[0.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]]))
    # Each layer's groups are averaged first: (1/2 + 1/3) / 2 for the first layer, 1/3 for the second.
    assert mean_sn_ratios(net)['sn_mean_bn'] == pytest.approx(((0.5 + 1 / 3) / 2 + 1 / 3) / 2)
    assert ssn_freezing(net) == {}
    ssn = DigitsNet((8,), **layer_cfgs('SSN', 4))
    first, second = [m.norm for m in ssn.features]
    with torch.no_grad():
        first.mean_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
        first.var_weight.copy_(torch.tensor([0.0, 1.0, 0.0]))
    first.set_radius(0.4)
    first.harden()
    first.set_radius(0.5)
    assert ssn_freezing(ssn) == dict(ssn_vectors=2, ssn_radius=0.5, ssn_frozen_mean_in=0, ssn_frozen_mean_ln=0,
                                     ssn_frozen_mean_bn=1, ssn_frozen_var_in=0, ssn_frozen_var_ln=1,
                                     ssn_frozen_var_bn=0)
    rows = [dict(task='classification', normalizer='SSN', images_per_process=1, seed=s, **ssn_freezing(ssn))
            for s in (0, 1)]
    assert '| SSN | 1 | 2.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | 1.0 ± 0.0 | 0.0 ± 0.0 | 1.0 ± 0.0 | 0.0 ± 0.0 | ' \
        '0.50 ± 0.00 |' in freezing_table(summarize(rows))


def test_ssn_run_follows_the_radius_schedule_and_the_logit_settings(monkeypatch):
    """One process, 20 steps: the radius reaches the vertex at 82% of the steps, so every ratio vector is
    frozen at the end; the logits step at a tenth of the learning rate, without weight decay, clipped."""
    setting = ClassificationSetting(normalizers=('SSN',), images_per_process=(2,), seeds=(0,), images=40,
                                    image_size=8, widths=(8,), num_groups=4, processes=1)
    data = load_digits(8)
    seen = {'clipped': []}
    original_step, original_clip = torch.optim.SGD.step, torch.nn.utils.clip_grad_norm_

    def step(self, *args, **kwargs):
        seen['groups'] = [(g['lr'], g['weight_decay'], len(g['params'])) for g in self.param_groups]
        return original_step(self, *args, **kwargs)

    def clip(params, max_norm, *args, **kwargs):
        seen['clipped'].append(([tuple(p.shape) for p in params], max_norm))
        return original_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, 'step', step)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', clip)
    result = train_one(setting, data, 'SSN', 2, 0, 0, 1)
    assert result['steps'] == 20
    assert result['ssn_vectors'] == 2
    assert sum(result[f'ssn_frozen_mean_{k}'] for k in ('in', 'ln', 'bn')) == 2
    assert sum(result[f'ssn_frozen_var_{k}'] for k in ('in', 'ln', 'bn')) == 2
    assert result['ssn_radius'] == pytest.approx(vertex_distance(3))
    (lr, decay, count), (logit_lr, logit_decay, logits) = seen['groups']
    assert logits == 4 and logit_lr == pytest.approx(lr / 10) and logit_decay == 0 and decay == 1e-4
    # The logits alone (mean and variance of two layers), clipped together at norm 1, every step.
    assert seen['clipped'] == [([(3,)] * 4, 1.0)] * 20


def test_summary_mean_and_sample_std():
    rows = [dict(task='classification', normalizer='BN', images_per_process=2, seed=s, accuracy=a,
                 final_train_loss=0.1) for s, a in enumerate((90.0, 92.0, 97.0))]
    rows.append(dict(task='detection', normalizer='GN', images_per_process=2, seed=0, bbox_mAP=30.0,
                     bbox_mAP_50=50.0))
    summary = {(s['task'], s['metric']): s for s in summarize(rows)}
    accuracy = summary[('classification', 'accuracy')]
    assert accuracy['mean'] == pytest.approx(statistics.mean((90, 92, 97)), abs=1e-4)
    assert accuracy['std'] == pytest.approx(statistics.stdev((90, 92, 97)), abs=1e-4)
    assert accuracy['n'] == 3
    assert ('classification', 'sn_mean_bn') not in summary
    assert summary[('detection', 'bbox_mAP')]['std'] == 0
    table = metric_table(summarize(rows), 'classification', 'accuracy')
    assert '| BN | 93.0 ± 3.6 |' in table and '| normalizer | 2 img/process |' in table


def test_setting_errors_name_the_fix():
    with pytest.raises(ValueError, match='smaller than one step of the largest global batch'):
        ClassificationSetting(normalizers=('BN',), images_per_process=(32,), seeds=(0,), images=32).check()
    with pytest.raises(ValueError, match='not divisible by num_groups'):
        ClassificationSetting(normalizers=('GN',), images_per_process=(1,), seeds=(0,), images=8,
                              widths=(12,)).check()


@pytest.mark.parametrize('argv,message', [
    (['--normalizers', 'BN,XN'], 'unknown normalizer.*XN'),
    (['--detection-normalizers', 'SyncSN'], 'SyncSN.*choose from BN'),
    (['--tasks', 'segmentation'], '--tasks takes'),
    (['--images-per-process', '64', '--images', '16'], 'smaller than one step'),
])
def test_cli_input_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(['--tiny', '--out', str(tmp_path)] + argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message shown without a GPU')
def test_cuda_setting_without_gpu_is_refused(tmp_path):
    with pytest.raises(SystemExit, match='--device cuda needs a CUDA GPU'):
        main(['--device', 'cuda', '--out', str(tmp_path)])
