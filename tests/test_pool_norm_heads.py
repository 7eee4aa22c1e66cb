"""PoolNormASPPHead / PoolNormPSPHead: mmseg's heads with their own norm after global pooling."""
import pytest
import torch
from mmengine.registry import MODELS, init_default_scope
from mmseg.models.decode_heads import ASPPHead, PSPHead
from torch import nn

import norm_plugins  # noqa: F401  (registers the heads)
from norm_plugins import SwitchableNorm
from norm_plugins.models.decode_heads import PoolNormASPPHead, PoolNormPSPHead

HEADS = {'aspp': (ASPPHead, PoolNormASPPHead, dict(dilations=(1, 2, 3))),
         'psp': (PSPHead, PoolNormPSPHead, dict(pool_scales=(1, 2, 3)))}
COMMON = dict(in_channels=8, channels=4, num_classes=3, dropout_ratio=0.)


def pooled_branches(head):
    """The (pool, ConvModule) pairs of a head whose pool outputs a single pixel."""
    sequences = [head.image_pool] if hasattr(head, 'image_pool') else list(head.psp_modules)
    return [seq for seq in sequences if seq[0].output_size in (1, (1, 1))]


def norm_of(conv_module):
    return conv_module.norm if conv_module.with_norm else None


@pytest.mark.parametrize('kind', HEADS)
def test_same_as_upstream_when_pool_norm_is_norm(kind):
    """Same parameters, same state-dict keys, same output as mmseg's head."""
    upstream_cls, ours_cls, extra = HEADS[kind]
    bn = dict(type='BN')
    torch.manual_seed(0)
    upstream = upstream_cls(norm_cfg=bn, **COMMON, **extra)
    ours = ours_cls(norm_cfg=bn, pool_norm_cfg=bn, **COMMON, **extra)
    assert ours.state_dict().keys() == upstream.state_dict().keys()
    ours.load_state_dict(upstream.state_dict())
    x = [torch.randn(2, 8, 6, 6)]
    for mode in (True, False):
        upstream.train(mode)
        ours.train(mode)
        torch.testing.assert_close(ours(x), upstream(x), rtol=0, atol=0)


@pytest.mark.parametrize('kind', HEADS)
def test_only_the_global_pooling_branch_changes(kind):
    _, ours_cls, extra = HEADS[kind]
    head = ours_cls(norm_cfg=dict(type='SN'), pool_norm_cfg=dict(type='BN'), **COMMON, **extra)
    pooled = pooled_branches(head)
    assert len(pooled) == 1
    assert isinstance(norm_of(pooled[0][1]), nn.BatchNorm2d)
    sn_layers = [m for m in head.modules() if isinstance(m, SwitchableNorm)]
    others = {'aspp': 3 + 1, 'psp': 2 + 1}[kind]  # spatial branches/bins + bottleneck
    assert len(sn_layers) == others
    spatial = []
    hooks = [m.register_forward_pre_hook(lambda _, args: spatial.append(args[0][0, 0].numel()))
             for m in sn_layers]
    head.train()
    out = head([torch.randn(2, 8, 6, 6)])
    assert out.shape == (2, 3, 6, 6) and torch.isfinite(out).all()
    assert min(spatial) > 1
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize('kind', HEADS)
def test_pool_norm_none_gives_a_biased_conv(kind):
    _, ours_cls, extra = HEADS[kind]
    head = ours_cls(norm_cfg=dict(type='SN'), pool_norm_cfg=None, **COMMON, **extra)
    conv_module = pooled_branches(head)[0][1]
    assert not conv_module.with_norm and conv_module.conv.bias is not None


def test_default_pool_norm_is_syncbn_and_not_shared():
    head = PoolNormASPPHead(norm_cfg=dict(type='SN'), **COMMON, dilations=(1, 2))
    assert isinstance(norm_of(head.image_pool[1]), nn.SyncBatchNorm)
    head.pool_norm_cfg['type'] = 'GN'
    fresh = PoolNormASPPHead(norm_cfg=dict(type='SN'), **COMMON, dilations=(1, 2))
    assert fresh.pool_norm_cfg['type'] == 'SyncBN'


@pytest.mark.parametrize('name, cls', [('PoolNormASPPHead', PoolNormASPPHead),
                                       ('PoolNormPSPHead', PoolNormPSPHead)])
def test_built_by_type_name_in_mmseg_scope(name, cls):
    init_default_scope('mmseg')
    extra = HEADS['aspp' if cls is PoolNormASPPHead else 'psp'][2]
    head = MODELS.build(
        dict(type=name, norm_cfg=dict(type='SN'), pool_norm_cfg=dict(type='BN'), **COMMON, **extra))
    assert type(head) is cls
