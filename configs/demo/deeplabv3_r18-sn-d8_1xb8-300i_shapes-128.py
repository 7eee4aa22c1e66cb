# DeepLabV3 with Switchable Normalization on the synthetic shapes dataset, from scratch.
# The ASPP image-pooling branch (a 1x1 map, where SN's instance statistics are degenerate) keeps
# BN through PoolNormASPPHead, as the SN papers advise.
_base_ = [
    'mmseg::_base_/models/deeplabv3_r50-d8.py',
    './_base_/shapes_semantic.py',
]
norm_cfg = dict(type='SN')
model = dict(
    data_preprocessor=dict(size=(128, 128)),
    pretrained=None,
    backbone=dict(depth=18, stem_channels=32, base_channels=32, norm_cfg=norm_cfg),
    decode_head=dict(
        type='PoolNormASPPHead',
        in_channels=256,
        channels=64,
        dilations=(1, 3, 6, 9),
        num_classes=4,
        norm_cfg=norm_cfg,
        pool_norm_cfg=dict(type='SyncBN', requires_grad=True)),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=4, norm_cfg=norm_cfg))
