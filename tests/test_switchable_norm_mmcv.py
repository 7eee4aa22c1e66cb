"""SN, SyncSN, SSN and SyncSSN built the OpenMMLab way: registration, mmcv's builders, mmdet and mmseg backbones."""
import importlib

import pytest
import torch
from mmcv.cnn import ConvModule, build_norm_layer
from mmengine.registry import MODELS

import norm_plugins  # registers the layers
from norm_plugins import SwitchableNorm, SyncSwitchableNorm
from norm_plugins.layers import SparseSwitchableNorm, SyncSparseSwitchableNorm
from norm_plugins.registry import register


@pytest.mark.parametrize('cfg, cls', [(dict(type='SN'), SwitchableNorm),
                                      (dict(type='SyncSN', group_size=8), SyncSwitchableNorm)])
def test_build_norm_layer(cfg, cls):
    name, layer = build_norm_layer(dict(cfg, normalizers=('in', 'bn'), requires_grad=False), 16,
                                   postfix=2)
    assert name == 'sn2' and type(layer) is cls
    assert layer.num_features == 16 and layer.normalizers == ('in', 'bn')
    assert all(not p.requires_grad for p in layer.parameters())


def test_build_norm_layer_reports_bad_options():
    with pytest.raises(ValueError, match='unknown normalizers'):
        build_norm_layer(dict(type='SN', normalizers=('in', 'gn')), 8)


def test_conv_module_with_sn():
    module = ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='SN'))
    assert module.norm_name == 'sn' and module.with_bias is False
    module.init_weights()
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    module(x).sum().backward()
    assert module.sn.mean_weight.grad is not None and torch.isfinite(x.grad).all()


def _forward_backward(backbone, size=64):
    x = torch.randn(2, 3, size, size, requires_grad=True)
    outs = backbone(x)
    sum(o.float().mean() for o in outs).backward()
    assert torch.isfinite(x.grad).all()
    return outs


@pytest.mark.parametrize('norm_type', ['SN', 'SyncSN'])
def test_mmdet_resnet18(norm_type):
    from mmdet.models.backbones import ResNet
    backbone = ResNet(depth=18, norm_cfg=dict(type=norm_type), norm_eval=False)
    backbone.init_weights()
    outs = _forward_backward(backbone)
    assert [o.shape[1] for o in outs] == [64, 128, 256, 512]
    keys = backbone.state_dict()
    assert 'layer1.0.sn1.weight' in keys and 'sn1.mean_weight' in keys
    assert 'layer2.0.downsample.1.running_var' in keys
    assert sum(isinstance(m, SwitchableNorm) for m in backbone.modules()) == 1 + 8 * 2 + 3

    copy = ResNet(depth=18, norm_cfg=dict(type=norm_type))
    missing, unexpected = copy.load_state_dict(backbone.state_dict(), strict=True)
    assert not missing and not unexpected
    backbone.eval()
    copy.eval()
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(backbone(x), copy(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mmseg_resnetv1c18():
    from mmseg.models.backbones import ResNetV1c
    backbone = ResNetV1c(depth=18, norm_cfg=dict(type='SN'), dilations=(1, 1, 2, 4),
                         strides=(1, 2, 1, 1))
    backbone.init_weights()
    outs = _forward_backward(backbone)
    assert outs[-1].shape[-1] == 8  # output stride 8
    assert 'stem.1.mean_weight' in backbone.state_dict()


def test_registration_survives_reload_and_refuses_foreign_names():
    importlib.reload(norm_plugins)
    assert MODELS.get('SN').__name__ == 'SwitchableNorm'

    class Impostor(torch.nn.Module):
        pass

    with pytest.raises(KeyError, match='already registered'):
        register(MODELS, 'SN', Impostor)
    assert norm_plugins.__version__


def test_ssn_built_from_norm_cfg_with_its_abbreviation():
    name, layer = build_norm_layer(dict(type='SSN', ratio_groups=2, momentum=0.003), 8, postfix=1)
    assert name == 'ssn1' and isinstance(layer, SparseSwitchableNorm) and layer.mean_weight.shape == (2, 3)
    name, sync = build_norm_layer(dict(type='SyncSSN', group_size=8), 8)
    assert name == 'ssn' and isinstance(sync, SyncSparseSwitchableNorm) and sync.group_size == 8
    assert 'group_size=8' in repr(sync)
