# PSPNet R50-D8 with SN in the backbone and both heads, the authors' 7x7-stem ResNet-50 SN (8, 2)
# backbone, and SyncBN in the pyramid's 1x1 bin (global pooling): see deeplabv3_r50-d8_sn.py.
_base_ = ['mmseg::_base_/models/pspnet_r50-d8.py', '../norm_plugins_runtime.py']
# The authors' SN, as in the pretrained backbone (its manifest entry): unbiased instance variance,
# running-statistics momentum 0.003 (0.997 kept).
norm_cfg = dict(type='SN', unbiased_instance_var=True, momentum=0.003)
model = dict(
    pretrained=None,
    # mmseg's norm_eval=False, written out: SN trains its statistics in finetuning, as in the papers.
    backbone=dict(
        type='ResNet', norm_cfg=norm_cfg, norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://resnet50_sn_8x2')),
    decode_head=dict(type='PoolNormPSPHead', norm_cfg=norm_cfg, pool_norm_cfg=dict(type='SyncBN')),
    auxiliary_head=dict(norm_cfg=norm_cfg))
