# Norm swaps shared by the DeepLabV3 and PSPNet recipes of both datasets. A variant inherits the SN
# recipe and this file and applies one with `model = _base_.<name>_model` (and `custom_hooks =
# _base_.<name>_hooks` where there is one). `_delete_` replaces the SN dict of the base, whose SN-only
# keys would otherwise reach GN/BCN. The global-pooling branch keeps SyncBN. SyncSN, group SN and SSN
# (SN's options; SSN adds SSNRadiusHook) keep the SN recipe's norm_eval=False and PreciseStatsHook; GN+WS and BCN+WS replace the hook (GN has no batch
# statistics; micro-batch BCN normalizes with its Algorithm 1 estimates, which batch averages leave alone).
# Group SN with two channel groups (TPAMI paper Sec. 3), from the SN (8, 2) backbone with each layer's ratios
# repeated over the groups (resnet50_sn_8x2_g2; the authors released no group-SN backbone).
sn_g2_norm_cfg = dict(type='SN', unbiased_instance_var=True, momentum=0.003, ratio_groups=2)
sn_g2_model = dict(
    backbone=dict(norm_cfg=sn_g2_norm_cfg, init_cfg=dict(checkpoint='norm_plugins://resnet50_sn_8x2_g2')),
    decode_head=dict(norm_cfg=sn_g2_norm_cfg),
    auxiliary_head=dict(norm_cfg=sn_g2_norm_cfg))

# Sparse SN (SSN, CVPR 2019) as the authors' SSN2d of their ResNet-50 SSN pretrained at (8, 2): with
# SSNRadiusHook and the SSN optimizer settings (norm_plugins_runtime.py).
ssn_norm_cfg = dict(type='SSN', unbiased_instance_var=True, momentum=0.003)
ssn_model = dict(
    backbone=dict(norm_cfg=ssn_norm_cfg, init_cfg=dict(checkpoint='norm_plugins://resnet50_ssn_8x2')),
    decode_head=dict(norm_cfg=ssn_norm_cfg),
    auxiliary_head=dict(norm_cfg=ssn_norm_cfg))

syncsn_norm_cfg = dict(type='SyncSN', unbiased_instance_var=True, momentum=0.003)
syncsn_model = dict(
    backbone=dict(norm_cfg=syncsn_norm_cfg),
    decode_head=dict(norm_cfg=syncsn_norm_cfg),
    auxiliary_head=dict(norm_cfg=syncsn_norm_cfg))

# GN(32) + WS with the authors' formula, which the JHU GN+WS backbone was trained with.
gn_ws_norm_cfg = dict(_delete_=True, type='GN', num_groups=32, requires_grad=True)
gn_ws_conv_cfg = dict(type='WSConv', formula='convws')
gn_ws_model = dict(
    backbone=dict(
        conv_cfg=gn_ws_conv_cfg, norm_cfg=gn_ws_norm_cfg,
        init_cfg=dict(checkpoint='open-mmlab://jhu/resnet50_gn_ws')),
    decode_head=dict(conv_cfg=gn_ws_conv_cfg, norm_cfg=gn_ws_norm_cfg),
    auxiliary_head=dict(conv_cfg=gn_ws_conv_cfg, norm_cfg=gn_ws_norm_cfg))
gn_ws_hooks = []

# Micro-batch BCN (update rate = learning rate, via BCNUpdateRateHook) + WS with the authors' BCN
# formula 'bcn', as the manifest entry of their ResNet-50 BCN+WS backbone.
bcn_ws_norm_cfg = dict(_delete_=True, type='BCN', num_groups=32, estimate=True)
bcn_ws_conv_cfg = dict(type='WSConv', formula='bcn')
bcn_ws_model = dict(
    backbone=dict(
        conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg, norm_eval=False,
        init_cfg=dict(checkpoint='norm_plugins://resnet50_bcn_ws')),
    decode_head=dict(conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg),
    auxiliary_head=dict(conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg))
bcn_ws_hooks = [dict(type='BCNUpdateRateHook')]
