"""WSConv built the OpenMMLab way (mmcv's builders and ConvModule) and against mmcv's ConvWS."""
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_conv_layer
from mmcv.cnn.bricks.conv_ws import ConvWS2d

import norm_plugins  # noqa: F401  (registers the layers)
from norm_plugins import WSConv1d, WSConv2d, WSConv3d


def test_convws_formula_matches_mmcv_conv_ws():
    torch.manual_seed(0)
    ours = WSConv2d(4, 8, 3, padding=1, groups=2, formula='convws')
    theirs = ConvWS2d(4, 8, 3, padding=1, groups=2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 6, 6)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs)
    grad = torch.randn_like(y_ours)
    (y_ours * grad).sum().backward()
    (y_theirs * grad).sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


@pytest.mark.parametrize('name,cls', [('WSConv', WSConv2d), ('WSConv1d', WSConv1d), ('WSConv2d', WSConv2d),
                                      ('WSConv3d', WSConv3d)])
def test_build_conv_layer(name, cls):
    layer = build_conv_layer(dict(type=name, formula='convws'), 4, 8, 3, padding=1)
    assert type(layer) is cls and layer.formula == 'convws'


def test_conv_module_with_norm_and_padding_mode():
    torch.manual_seed(0)
    module = ConvModule(8, 16, 3, padding=1, conv_cfg=dict(type='WSConv'),
                        norm_cfg=dict(type='BCN', num_groups=4, estimate=True), bias='auto',
                        padding_mode='reflect')
    module.init_weights()
    assert isinstance(module.conv, WSConv2d) and module.conv.bias is None  # bias='auto' with a norm
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    y = module(x)
    y.sum().backward()
    assert y.shape == (1, 16, 5, 5) and torch.isfinite(module.conv.weight.grad).all()
    plain = ConvModule(8, 16, 3, padding=1, dilation=1, groups=2, conv_cfg=dict(type='WSConv'), norm_cfg=None,
                       act_cfg=None)
    assert plain.conv.bias is not None and plain.conv.groups == 2
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.conv.standardized_weight(), plain.conv.bias,
                                                  padding=1, groups=2))
