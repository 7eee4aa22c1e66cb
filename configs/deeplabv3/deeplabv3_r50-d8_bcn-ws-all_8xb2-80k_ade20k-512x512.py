# Micro-batch BCN (update rate = learning rate, via BCNUpdateRateHook) + WS ('paper' formula, as the
# manifest entry of the authors' ResNet-50 BCN+WS backbone) in backbone and heads.
_base_ = './deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py'
# _delete_: replace the SN dict of the base (its SN-only keys would reach BCN).
norm_cfg = dict(_delete_=True, type='BCN', num_groups=32, estimate=True)
conv_cfg = dict(type='WSConv', formula='paper')
model = dict(
    backbone=dict(
        conv_cfg=conv_cfg, norm_cfg=norm_cfg, init_cfg=dict(checkpoint='norm_plugins://resnet50_bcn_ws')),
    decode_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    auxiliary_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg))
custom_hooks = [dict(type='BCNUpdateRateHook')]
