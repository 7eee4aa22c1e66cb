# GN(32) + WS (the authors' formula, which the JHU GN+WS backbone was trained with) in backbone and heads.
_base_ = './pspnet_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py'
# _delete_: replace the SN dict of the base (its SN-only keys would reach GN).
norm_cfg = dict(_delete_=True, type='GN', num_groups=32, requires_grad=True)
conv_cfg = dict(type='WSConv', formula='convws')
model = dict(
    backbone=dict(
        conv_cfg=conv_cfg, norm_cfg=norm_cfg, init_cfg=dict(checkpoint='open-mmlab://jhu/resnet50_gn_ws')),
    decode_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    auxiliary_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg))
