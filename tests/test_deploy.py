"""Deployment: folded WSConv, hard SN as the normalizer it selects, folded BCN; outputs unchanged."""
import copy
import subprocess
import sys

import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

import norm_plugins  # noqa: F401 - registers the layers
from norm_plugins.analysis import recompute_batch_stats
from norm_plugins.deploy import ChannelAffine, deploy_model
from norm_plugins.deploy.inference import max_difference, network_outputs
from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d
from tools_helpers import REPO, tool_env

CHOICES = {'in': 0, 'ln': 1, 'bn': 2}


def _sn(channels, mean, var, cls=SwitchableNorm, seed=0, **kwargs):
    """An SN with trained-looking parameters, statistics, and one-hot ratios (mean, var)."""
    generator = torch.Generator().manual_seed(seed)
    layer = cls(channels, **kwargs)
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            layer.bias.copy_(torch.randn(channels, generator=generator))
        if layer.track_running_stats:
            layer.running_mean.copy_(torch.randn(channels, generator=generator))
            layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        layer.mean_weight.zero_()[CHOICES[mean]] = 1.0
        if layer.var_weight is not None:
            layer.var_weight.zero_()[CHOICES[var]] = 1.0
    return layer.harden()


def _bcn(channels, estimate, seed=1):
    generator = torch.Generator().manual_seed(seed)
    layer = BatchChannelNorm(channels, num_groups=4, estimate=estimate)
    mean, var = (layer.estimated_mean, layer.estimated_var) if estimate else (layer.running_mean, layer.running_var)
    with torch.no_grad():
        mean.copy_(torch.randn(channels, generator=generator))
        var.copy_(torch.rand(channels, generator=generator) + 0.5)
        for param in (layer.weight, layer.group_weight):
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        for param in (layer.bias, layer.group_bias):
            param.copy_(torch.randn(param.shape, generator=generator))
    return layer


def _check_equal(model, x, atol=1e-5):
    reference = copy.deepcopy(model)
    reference.eval()  # mmdet's ResNet.train() returns None: no chaining
    report = deploy_model(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=atol)
        model64, reference64 = copy.deepcopy(reference).double(), copy.deepcopy(reference).double()
        deploy_model(model64)
        torch.testing.assert_close(model64(x.double()), reference64(x.double()), rtol=1e-11, atol=1e-11)
    return report


def test_sequential_of_every_choice_matches_and_has_no_plugin_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        WSConv2d(3, 8, 3, padding=1, bias=False), _sn(8, 'bn', 'bn'), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), _sn(8, 'in', 'in', seed=1), nn.ReLU(),
        nn.Conv2d(8, 8, 1), _sn(8, 'ln', 'ln', seed=2),
        nn.Conv2d(8, 8, 1), _sn(8, 'bn', 'in', seed=3),
        nn.Conv2d(8, 8, 1), _sn(8, 'ln', 'bn', seed=4, cls=SyncSwitchableNorm),
        nn.Conv2d(8, 8, 1), _sn(8, 'in', 'in', seed=5, unbiased_instance_var=True),
        nn.ReLU(), _sn(8, 'bn', 'bn', seed=6),  # no conv before it
        nn.Conv2d(8, 8, 3, padding=1, bias=False), _bcn(8, estimate=False),
        nn.Conv2d(8, 8, 1), _bcn(8, estimate=True, seed=2),
        nn.ReLU(), _bcn(8, estimate=False, seed=3),
    )
    x = torch.randn(2, 3, 9, 7)
    reference = copy.deepcopy(model).eval()
    report = _check_equal(model, x)
    # Deployed layers also run with autograd on (e.g. under tracing exporters).
    torch.testing.assert_close(model(x), reference(x).detach(), rtol=1e-5, atol=1e-5)
    assert report == {'WSConv folded': 1, 'SN(BN) folded into conv': 1, 'SN -> GroupNorm(C) (IN)': 1,
                      'SN -> GroupNorm(1) (LN)': 1, 'SN kept (hard, mean BN, var IN: no standard layer)': 1,
                      'SN kept (hard, mean LN, var BN: no standard layer)': 1,
                      'SN kept (hard, unbiased IN: no standard layer)': 1,
                      'SN(BN) -> ChannelAffine': 1, 'BCN -> conv fold + GroupNorm': 2,
                      'BCN -> ChannelAffine + GroupNorm': 1}
    kinds = [type(m) for m in model]
    assert kinds[:3] == [nn.Conv2d, nn.Identity, nn.ReLU] and model[0].bias is not None
    assert kinds[4] is nn.GroupNorm and model[4].num_groups == 8 and model[7].num_groups == 1
    assert [i for i, m in enumerate(model) if isinstance(m, SwitchableNorm)] == [9, 11, 13]
    assert isinstance(model[15], ChannelAffine)
    assert not any(isinstance(m, (BatchChannelNorm, WSConv2d)) for m in model.modules())


def test_conv_module_and_3d_inputs():
    torch.manual_seed(0)
    block = nn.Sequential(
        ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='SN'), act_cfg=dict(type='ReLU')),
        ConvModule(8, 8, 3, padding=1, conv_cfg=dict(type='WSConv'), norm_cfg=dict(type='BCN', num_groups=4)),
        ConvModule(8, 8, 1, norm_cfg=dict(type='SN'), order=('norm', 'conv', 'act')))
    block[0].norm.load_state_dict(_sn(8, 'bn', 'bn').state_dict())
    block[0].norm.harden()
    block[1].norm.load_state_dict(_bcn(8, estimate=False).state_dict())
    block[2].norm.load_state_dict(_sn(8, 'bn', 'bn', seed=3).state_dict())
    block[2].norm.harden()
    report = _check_equal(block, torch.randn(2, 3, 6, 6))
    assert report['SN(BN) folded into conv'] == 1 and report['SN(BN) -> ChannelAffine'] == 1  # norm before conv
    assert report['BCN -> conv fold + GroupNorm'] == 1
    volume = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), _sn(4, 'bn', 'bn'), nn.Conv3d(4, 4, 1), _sn(4, 'ln', 'in'))
    _check_equal(volume, torch.randn(2, 2, 3, 4, 5))


def test_soft_and_batch_dependent_sn_are_kept():
    soft = SwitchableNorm(4)
    no_running = _sn(4, 'bn', 'bn', track_running_stats=False)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), soft, nn.Conv2d(4, 4, 1), no_running)
    report = _check_equal(model, torch.randn(3, 2, 4, 4))
    assert model[1] is soft and model[3] is no_running
    assert report == {'SN kept (soft ratios; harden first)': 1, 'SN kept (BN part uses batch statistics in eval)': 1}
    hardened = deploy_model(nn.Sequential(nn.Conv2d(2, 4, 1), SwitchableNorm(4)), harden=True)
    assert hardened == {'SN -> GroupNorm(C) (IN)': 1}  # equal logits: the first normalizer


def test_mmdet_resnet_with_sn_wsconv_and_bcn_blocks():
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    for norm_cfg, conv_cfg in ((dict(type='SN'), dict(type='WSConv')), (dict(type='BCN', num_groups=4), None)):
        backbone = ResNet(depth=18, base_channels=8, norm_cfg=norm_cfg, conv_cfg=conv_cfg, out_indices=(0, 3))
        for i, module in enumerate(backbone.modules()):
            if isinstance(module, SwitchableNorm):
                module.load_state_dict(_sn(module.num_features, 'bn' if i % 3 else 'in', 'bn' if i % 2 else 'ln',
                                           seed=i).state_dict())
                module.harden()
            elif isinstance(module, BatchChannelNorm):
                module.load_state_dict(_bcn(module.num_features, estimate=False, seed=i).state_dict())
        # Statistics that fit the activations, as after training (random ones blow activations up).
        recompute_batch_stats(backbone, [torch.randn(4, 3, 64, 64) for _ in range(2)], 2)
        report = _check_equal(backbone, torch.randn(2, 3, 64, 64))
        if norm_cfg['type'] == 'SN':
            assert report['SN(BN) folded into conv'] > 0 and report['WSConv folded'] > 0
        else:
            assert report == {'BCN -> conv fold + GroupNorm': 20}  # all follow a conv: stem, 8x2 in blocks, 3 shortcuts


def _leaves(output):
    if isinstance(output, torch.Tensor):
        return [output]
    assert isinstance(output, (list, tuple)), type(output)
    return [t for item in output for t in _leaves(item)]


@pytest.mark.slow
def test_deploy_tool_on_the_demo_mask_rcnn(tmp_path):
    from mmdet.structures import DetDataSample

    from norm_plugins.analysis.model_io import build_model
    config = str(REPO / 'configs' / 'demo' / 'mask-rcnn_r18-sn_fpn_1xb8-600i_shapes-128.py')
    model = build_model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                module.mean_weight.copy_(torch.randn(3, generator=generator))
                module.var_weight.copy_(torch.randn(3, generator=generator))
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    checkpoint = tmp_path / 'sn.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    out = tmp_path / 'deployed.pth'
    result = subprocess.run([sys.executable, 'tools/deploy.py', config, str(checkpoint), '--harden', '--input-size',
                             '64', '64', '--benchmark', '1', '--out', str(out), '--onnx', str(tmp_path / 'feat.onnx')],
                            cwd=REPO, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'when converted in float64' in result.stdout and 'speedup' in result.stdout
    exact = float(result.stdout.split('difference on a 64x64 input: ')[1].split(' ')[0])
    assert exact <= 1e-10
    onnx_difference = float(result.stdout.split('largest onnxruntime difference: ')[1].split()[0])
    assert onnx_difference < 1e-4  # float32 backbone+neck features of magnitude ~10
    # The saved model against the original, directly: features, RPN outputs and RoI head outputs on
    # the original's proposals.
    deployed = torch.load(out, weights_only=False).eval()
    original = build_model(config, str(checkpoint)).eval()
    kept = [m for m in deployed.modules() if isinstance(m, SwitchableNorm)]
    assert 'SN kept (hard' in result.stdout and kept and all(m.hard_ratios for m in kept)
    for m in original.modules():
        if isinstance(m, SwitchableNorm):
            m.harden()
    assert not any(isinstance(m, (BatchChannelNorm, WSConv2d)) for m in deployed.modules())
    inputs = torch.randn(2, 3, 64, 64, generator=generator)
    samples = [DetDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64),
                                           batch_input_shape=(64, 64), scale_factor=(1.0, 1.0))) for _ in range(2)]
    with torch.no_grad():
        features = original.extract_feat(inputs)
        proposals = original.rpn_head.predict(features, samples, rescale=False)
        expected = _leaves([features, original.rpn_head(features),
                            original.roi_head.forward(features, copy.deepcopy(proposals), copy.deepcopy(samples))])
        deployed_features = deployed.extract_feat(inputs)
        actual = _leaves([deployed_features, deployed.rpn_head(deployed_features),
                          deployed.roi_head.forward(deployed_features, proposals, samples)])
    assert len(expected) == len(actual) >= 5 + 10 + 3  # 5 levels, RPN scores and boxes per level, RoI outputs
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, float(e.abs().max())))
    soft = subprocess.run([sys.executable, 'tools/deploy.py', config, str(checkpoint), '--tolerance', '-1'],
                          cwd=REPO, env=tool_env(), capture_output=True, text=True)
    assert soft.returncode == 2 and 'nothing saved' in soft.stderr


def test_an_empty_comparison_raises():
    with pytest.raises(ValueError, match='nothing to compare'):
        max_difference([], [])
    with pytest.raises(ValueError, match='nothing to compare'):
        max_difference([torch.zeros(0, 4)], [torch.zeros(0, 4)])
    assert max_difference([torch.zeros(0, 4), torch.ones(2)], [torch.zeros(0, 4), torch.zeros(2)]) == 1.0

    class Described(nn.Module):  # an output with numbers in no tensor
        def forward(self, x):
            return [{'boxes': x.sum().item()}]

    with pytest.raises(TypeError, match='holds a float, which cannot be compared'):
        network_outputs(Described(), torch.ones(1, 2), [])
