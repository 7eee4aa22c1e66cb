# PSPNet with Batch-Channel Normalization (micro-batch estimates, Algorithm 1) and Weight
# Standardization on the synthetic shapes dataset, from scratch. The global-pooling bin of the
# pyramid (a 1x1 map) keeps BN through PoolNormPSPHead, like the recipes in configs/pspnet.
_base_ = [
    'mmseg::_base_/models/pspnet_r50-d8.py',
    './_base_/shapes_semantic.py',
]
norm_cfg = dict(type='BCN', num_groups=8, estimate=True)
conv_cfg = dict(type='WSConv')
model = dict(
    data_preprocessor=dict(size=(128, 128)),
    pretrained=None,
    backbone=dict(depth=18, stem_channels=32, base_channels=32, norm_cfg=norm_cfg, conv_cfg=conv_cfg),
    decode_head=dict(
        type='PoolNormPSPHead',
        in_channels=256,
        channels=64,
        num_classes=4,
        norm_cfg=norm_cfg,
        conv_cfg=conv_cfg,
        pool_norm_cfg=dict(type='SyncBN', requires_grad=True)),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=4, norm_cfg=norm_cfg, conv_cfg=conv_cfg))
# The BCN paper sets the estimates' update rate r to the learning rate of SGD; with AdamW's
# 10x smaller learning rate the factor keeps r at the same scale (0.01).
custom_hooks = [dict(type='BCNUpdateRateHook', factor=10.0)]
