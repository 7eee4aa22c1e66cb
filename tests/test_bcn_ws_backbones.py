"""WSConv + BCN inside mmdet and mmseg backbones, built through their registries."""
import pytest
import torch
from mmcv.cnn import build_norm_layer
from mmdet.registry import MODELS as DET_MODELS
from mmengine.registry import DefaultScope
from mmseg.registry import MODELS as SEG_MODELS

from norm_plugins import BatchChannelNorm, WSConv2d


def _forward_backward(backbone, batch):
    backbone.init_weights()
    backbone.train()
    x = torch.randn(batch, 3, 64, 64)
    outs = backbone(x)
    sum(o.square().mean() for o in outs).backward()
    return outs


def _check_plugged(backbone, estimate):
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in backbone.modules() if isinstance(m, BatchChannelNorm)]
    assert convs and all(isinstance(m, WSConv2d) for m in convs)
    assert norms and all(m.estimate == estimate for m in norms)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    for conv in convs:
        assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    # zero_init_residual zeroes the last norm of each block, so only some norms get gradients now.
    assert any(norm.weight.grad.abs().sum() > 0 for norm in norms)
    for norm in norms:
        assert all(torch.isfinite(p.grad).all() for p in norm.parameters())
        if estimate:  # Algorithm 1 moved the estimates in the one training step
            assert not torch.equal(norm.estimated_var, torch.ones_like(norm.estimated_var))


@pytest.mark.parametrize('estimate,batch', [(False, 2), (True, 1)])
def test_mmdet_resnet18(estimate, batch):
    # The scope a Runner (earlier in the session) may have left as default would hide mmdet's classes.
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = DET_MODELS.build(dict(
            type='ResNet', depth=18, conv_cfg=dict(type='WSConv'),
            norm_cfg=dict(type='BCN', estimate=estimate, requires_grad=True), norm_eval=False,
            out_indices=(0, 1, 2, 3)))
    outs = _forward_backward(backbone, batch)
    assert [o.shape[1] for o in outs] == [64, 128, 256, 512]
    assert 'layer1.0.bcn1.weight' in backbone.state_dict()
    assert ('layer1.0.bcn1.estimated_mean' in backbone.state_dict()) == estimate
    _check_plugged(backbone, estimate)


@pytest.mark.parametrize('estimate', [False, True])
def test_mmseg_resnetv1c18(estimate):
    with DefaultScope.overwrite_default_scope('mmseg'):
        backbone = SEG_MODELS.build(dict(
            type='ResNetV1c', depth=18, conv_cfg=dict(type='WSConv'),
            norm_cfg=dict(type='BCN', estimate=estimate, requires_grad=True), norm_eval=False,
            dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)))
    outs = _forward_backward(backbone, 2)
    assert outs[-1].shape[-2:] == (8, 8)  # output stride 8 with dilation
    _check_plugged(backbone, estimate)


def test_build_norm_layer():
    name, layer = build_norm_layer(dict(type='BCN', num_groups=16, estimate=True, update_rate=0.01), 64,
                                   postfix=2)
    assert name == 'bcn2' and isinstance(layer, BatchChannelNorm)
    assert layer.num_groups == 16 and layer.eps == 1e-5 and float(layer.update_rate) == pytest.approx(0.01)
    _, frozen = build_norm_layer(dict(type='BCN', requires_grad=False), 64)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match='does not divide num_features=48'):
        build_norm_layer(dict(type='BCN'), 48)
    with pytest.raises(TypeError, match='unexpected keyword'):
        build_norm_layer(dict(type='BCN', estimated=True), 64)
