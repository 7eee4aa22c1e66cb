"""SN ratio analysis: per-layer ratios, grouping, divergences, figures, the logging hook and the tools."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from mmdet.models.backbones import ResNet
from torch import nn

import norm_plugins  # noqa: F401 - registers layers and hooks
from norm_plugins.analysis import (collect_ratios, compare_ratios, group_means, group_of, ratio_scalars, ratio_table,
                                   ratios_from_model, ratios_from_state_dict, read_ratio_series, symmetric_kl)
from norm_plugins.analysis.plots import plot_divergence, plot_layer_ratios, plot_ratio_dynamics
from norm_plugins.hooks import SNRatioLoggerHook
from norm_plugins.layers import SwitchableNorm
from runner_helpers import tiny_runner
from tools_helpers import MASK_RCNN, REPO

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _random_logits(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                for logits in module._mixture_logits().values():
                    logits.copy_(torch.randn(logits.shape, generator=generator))
    return model


def _backbone(seed=0):
    return _random_logits(ResNet(depth=18, base_channels=4, norm_cfg=dict(type='SN'), out_indices=(3,)), seed)


def test_symmetric_kl_matches_the_definition():
    p, q = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.1, 0.3])
    expected = sum(a * math.log(a / b) + b * math.log(b / a) for a, b in zip(p.tolist(), q.tolist()))
    assert symmetric_kl(p, q) == pytest.approx(expected, rel=1e-6)
    assert symmetric_kl(p, p) == 0
    # Unused normalizers (0 in both) contribute nothing; disagreeing one-hot vectors stay finite.
    assert symmetric_kl(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5, 0.5, 0.0])) == 0
    assert math.isfinite(symmetric_kl(torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])))


@pytest.mark.parametrize('name, group', [
    ('backbone.sn1', 'backbone.stem'), ('backbone.layer3.1.sn2', 'backbone.layer3'),
    ('backbone.stem.1', 'backbone.stem'), ('module.backbone.layer1.0.downsample.1', 'backbone.layer1'),
    ('neck.fpn_convs.0.sn', 'neck'), ('roi_head.mask_head.convs.3.sn', 'roi_head.mask_head'),
    ('rpn_head.rpn_conv.sn', 'rpn_head'), ('decode_head.bottleneck.sn', 'decode_head'),
    ('module.layer2.0.sn1', 'layer2'), ('sn1', 'stem')])
def test_group_of(name, group):
    assert group_of(name) == group


def test_ratios_from_model_and_from_state_dict_agree():
    model = _backbone()
    from_model = ratios_from_model(model)
    from_state = ratios_from_state_dict({f'module.{k}': v for k, v in model.state_dict().items()})
    assert len(from_model) == len(from_state) == 20
    first = model.sn1
    torch.testing.assert_close(from_model[0].mean, F.softmax(first.mean_weight.detach(), 0))
    for a, b in zip(from_model, from_state):
        assert a.name == b.name and a.group == b.group
        torch.testing.assert_close(a.mean, b.mean)
        torch.testing.assert_close(a.var, b.var)
    assert list(group_means(from_model)) == ['stem'] + [f'layer{i}' for i in range(1, 5)]  # a bare backbone
    layer1 = [layer for layer in from_model if layer.group == 'layer1']
    torch.testing.assert_close(group_means(from_model)['layer1']['var'],
                               torch.stack([layer.var for layer in layer1]).mean(0))


def test_subsets_and_tied_layers():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), SwitchableNorm(4, normalizers=('in', 'ln'), tied=True),
                          SwitchableNorm(4, normalizers=('ln', 'bn')))
    _random_logits(model)
    layers = ratios_from_model(model)
    assert layers[0].mean[2] == 0 and torch.equal(layers[0].mean, layers[0].var) and layers[0].divergence() == 0
    assert layers[1].mean[0] == 0 and layers[1].normalizers == ('ln', 'bn')
    # Without the model, two logits are read as the authors' (IN, LN); a single one cannot be read.
    assert ratios_from_state_dict(model.state_dict())[0].normalizers == ('in', 'ln')
    with pytest.raises(ValueError, match='Pass the training config'):
        ratios_from_state_dict({'x.mean_weight': torch.zeros(1)})


def test_table_lists_every_layer_with_hard_choice_and_divergence():
    model = _backbone()
    layers = ratios_from_model(model)
    table = ratio_table(layers).splitlines()
    assert len(table) == 2 + len(layers)
    row = table[2].split()
    assert row[:2] == ['sn1', 'stem']
    choice = f"{layers[0].choice('mean').upper()}/{layers[0].choice('var').upper()}"
    assert row[4] == choice and float(row[5]) == pytest.approx(layers[0].divergence(), abs=1e-4)


def test_figures_are_written_and_non_empty(tmp_path):
    layers = ratios_from_model(_backbone())
    other = ratios_from_model(_backbone(seed=1))
    written = plot_layer_ratios(layers, str(tmp_path / 'ratios'))
    rows = compare_ratios(layers, other)
    written += plot_divergence(rows, str(tmp_path / 'div'))
    written += plot_ratio_dynamics({'backbone.layer1': {'mean': {'in': [(0, 0.3), (10, 0.5)]},
                                                        'var': {'bn': [(0, 0.3), (10, 0.2)]}}}, str(tmp_path / 'dyn'))
    assert [p.rsplit('.', 1)[1] for p in written] == ['png', 'svg'] * 3
    for path in written:
        data = open(path, 'rb').read()
        assert len(data) > 5000
        assert data.startswith(PNG_MAGIC) if path.endswith('png') else b'<svg' in data[:2000]
    # 4 bars per layer (3 stacked ratios) in each panel of the ratio figure.
    assert open(tmp_path / 'ratios.svg').read().count('id="patch_') >= 2 * 3 * len(layers)
    assert rows[0][1] == pytest.approx(symmetric_kl(layers[0].mean, other[0].mean))
    assert compare_ratios(layers, layers)[3][1:] == (0.0, 0.0)
    with pytest.raises(ValueError, match='share no SN layer'):
        compare_ratios(layers, ratios_from_model(nn.Sequential(SwitchableNorm(2))))


def test_logger_hook_writes_group_ratios_and_the_plot_reads_them(tmp_path):
    runner = tiny_runner(tmp_path, [dict(type='SNRatioLoggerHook', interval=2)], max_iters=4, val_interval=100)
    runner.train()
    series = read_ratio_series(str(tmp_path))
    assert set(series) == {'backbone.stem', 'neck'}
    steps = [step for step, _ in series['neck']['mean']['in']]
    assert steps == [0, 2, 4]
    # The last logged values are the model's ratios at the end of training.
    final = ratio_scalars(runner.model)
    for group in series:
        for which in ('mean', 'var'):
            for normalizer in ('in', 'ln', 'bn'):
                assert series[group][which][normalizer][-1][1] == pytest.approx(
                    final[f'sn_ratios/{group}/{which}/{normalizer}'], abs=1e-6)
    assert series['neck']['mean']['in'][0][1] == pytest.approx(1 / 3)  # initial ratios
    assert series['neck']['mean']['in'][-1][1] != pytest.approx(1 / 3)  # they moved
    written = subprocess.run([sys.executable, 'tools/analysis/plot_sn_ratio_dynamics.py', str(tmp_path), '--out',
                              str(tmp_path / 'dyn')], cwd=REPO, capture_output=True, text=True)
    assert written.returncode == 0, written.stderr[-2000:]
    assert (tmp_path / 'dyn.png').stat().st_size > 5000 and (tmp_path / 'dyn.svg').stat().st_size > 5000
    with pytest.raises(ValueError, match='interval must be a positive int'):
        SNRatioLoggerHook(interval=0)


@pytest.mark.slow
def test_sn_ratios_tool_with_and_without_config(tmp_path):
    from norm_plugins.analysis.model_io import build_model
    first, second = tmp_path / 'a.pth', tmp_path / 'b.pth'
    model = build_model(str(MASK_RCNN))
    torch.save({'state_dict': _random_logits(model, 0).state_dict(), 'meta': {}}, first)
    torch.save({'state_dict': _random_logits(model, 1).state_dict()}, second)
    result = subprocess.run([sys.executable, 'tools/analysis/sn_ratios.py', str(first), '--compare', str(second),
                             '--out-dir', str(tmp_path / 'out')], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '36 common layers' in result.stdout
    for name in ('a_ratios.txt', 'a_ratios.png', 'a_ratios.svg', 'a_vs_b_divergence.png', 'a_vs_b_divergence.svg'):
        assert (tmp_path / 'out' / name).stat().st_size > 1000
    with_config = collect_ratios(str(first), str(MASK_RCNN))
    without = collect_ratios(str(first))
    assert [layer.name for layer in with_config] == [layer.name for layer in without]
    groups = {layer.group for layer in with_config}
    assert groups == {'backbone.stem', 'backbone.layer1', 'backbone.layer2', 'backbone.layer3', 'backbone.layer4',
                      'neck', 'roi_head.bbox_head', 'roi_head.mask_head'}
    empty = tmp_path / 'empty.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}}, empty)
    failed = subprocess.run([sys.executable, 'tools/analysis/sn_ratios.py', str(empty)], cwd=REPO, capture_output=True,
                            text=True)
    assert failed.returncode == 2 and 'holds no SN layer' in failed.stderr
