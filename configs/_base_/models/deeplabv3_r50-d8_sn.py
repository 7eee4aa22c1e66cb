# DeepLabV3 R50-D8 (output stride 8, dilations 2 and 4, auxiliary FCN head with loss weight 0.4) with SN
# in the backbone and both heads. The backbone has the authors' 7x7 stem (mmseg `ResNet`, i.e. V1b; the
# V1c deep stem of mmseg's default cannot hold their weights) and is their ResNet-50 SN pretrained at
# (8, 2). The ASPP image-pooling branch (1x1 map) uses SyncBN, not SN: see configs/README.md.
_base_ = ['mmseg::_base_/models/deeplabv3_r50-d8.py', '../norm_plugins_runtime.py']
# The authors' SN, as in the pretrained backbone (its manifest entry): unbiased instance variance,
# running-statistics momentum 0.003 (0.997 kept).
norm_cfg = dict(type='SN', unbiased_instance_var=True, momentum=0.003)
model = dict(
    pretrained=None,
    # mmseg's norm_eval=False, written out: SN trains its statistics in finetuning, as in the papers.
    backbone=dict(
        type='ResNet', norm_cfg=norm_cfg, norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://resnet50_sn_8x2')),
    decode_head=dict(type='PoolNormASPPHead', norm_cfg=norm_cfg, pool_norm_cfg=dict(type='SyncBN')),
    auxiliary_head=dict(norm_cfg=norm_cfg))
