"""WSConv against plain float64 formulas (Eq. 5-7 and the authors'/mmcv ConvWS), gradcheck, fold();
mmcv's builders and its ConvWS itself: test_weight_standardization_mmcv.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from norm_plugins import WSConv1d, WSConv2d, WSConv3d

EPS = 1e-5


def reference_standardize(weight, formula, eps=EPS):
    """Per output channel, entry by entry, in float64."""
    out = torch.empty_like(weight, dtype=torch.float64)
    for o in range(weight.shape[0]):
        values = [float(v) for v in weight[o].flatten()]
        count = len(values)
        mu = sum(values) / count
        squares = sum((v - mu) ** 2 for v in values)
        if formula == 'paper':
            denom = math.sqrt(squares / count + eps)
        elif formula == 'bcn':
            denom = math.sqrt(squares / (count - 1) + eps)
        else:
            denom = math.sqrt(squares / (count - 1)) + eps
        out[o] = torch.tensor([(v - mu) / denom for v in values], dtype=torch.float64).view(weight[o].shape)
    return out


CONVS = {1: (WSConv1d, F.conv1d, nn.Conv1d), 2: (WSConv2d, F.conv2d, nn.Conv2d), 3: (WSConv3d, F.conv3d, nn.Conv3d)}


@pytest.mark.parametrize('formula', ['paper', 'convws', 'bcn'])
@pytest.mark.parametrize('dims', [1, 2, 3])
def test_matches_reference(dims, formula):
    torch.manual_seed(0)
    cls, conv_fn, _ = CONVS[dims]
    layer = cls(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, formula=formula).double()
    x = torch.randn((2, 4) + (5,) * dims, dtype=torch.float64)
    w_hat = reference_standardize(layer.weight.detach(), formula)
    torch.testing.assert_close(layer.standardized_weight(), w_hat)
    torch.testing.assert_close(layer(x), conv_fn(x, w_hat, layer.bias, stride=2, padding=1, groups=2))


def test_standardized_weight_has_zero_mean_unit_variance():
    layer = WSConv2d(8, 16, 3).double()
    flat = layer.standardized_weight().flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(16, dtype=torch.float64))
    var = flat.var(1, correction=0)
    torch.testing.assert_close(var, layer.weight.flatten(1).var(1, correction=0) / (layer.weight.flatten(1).var(
        1, correction=0) + EPS))


@pytest.mark.parametrize('formula', ['paper', 'convws', 'bcn'])
@pytest.mark.parametrize('dims', [1, 2, 3])
def test_gradcheck_float64(dims, formula):
    torch.manual_seed(0)
    cls = CONVS[dims][0]
    layer = cls(2, 3, 2, padding=1, formula=formula).double()
    x = torch.randn((1, 2) + (3,) * dims, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, layer.weight, layer.bias))


@pytest.mark.parametrize('formula', ['paper', 'convws', 'bcn'])
def test_constant_filter_is_finite(formula):
    layer = WSConv2d(3, 2, 3, padding=1, formula=formula)
    with torch.no_grad():
        layer.weight.fill_(0.7)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    torch.testing.assert_close(layer.standardized_weight(), torch.zeros_like(layer.weight))
    for t in (y, x.grad, layer.weight.grad):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize('dims,kwargs', [
    (1, dict(stride=2, padding=2, dilation=2, bias=False)),
    (2, dict(stride=1, padding=1, groups=2, padding_mode='reflect')),
    (2, dict(stride=2, padding=1, dilation=2, padding_mode='circular', formula='convws')),
    (3, dict(padding=1, groups=4, padding_mode='replicate')),
])
def test_fold_returns_plain_conv_with_identical_outputs(dims, kwargs):
    torch.manual_seed(0)
    cls, _, plain_cls = CONVS[dims]
    layer = cls(4, 8, 3, **kwargs).eval()
    x = torch.randn((2, 4) + (7,) * dims)
    folded = layer.fold()
    assert type(folded) is plain_cls
    assert not folded.training
    assert (folded.bias is None) == (layer.bias is None)
    assert folded.padding_mode == layer.padding_mode
    torch.testing.assert_close(folded(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.weight, layer.standardized_weight())


def test_autocast_runs_convolution_in_low_precision():
    layer = WSConv2d(4, 8, 3)
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown formula 'mmcv'"):
        WSConv2d(4, 8, 3, formula='mmcv')
    with pytest.raises(ValueError, match='eps must be > 0'):
        WSConv2d(4, 8, 3, eps=0)
    with pytest.raises(ValueError, match='single weight'):
        WSConv2d(4, 4, 1, groups=4)
    with pytest.raises(TypeError, match='unexpected keyword'):
        WSConv2d(4, 8, 3, std='paper')
