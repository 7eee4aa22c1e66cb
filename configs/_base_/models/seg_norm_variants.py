# Norm swaps shared by the DeepLabV3 and PSPNet recipes of both datasets. A variant inherits the SN
# recipe and this file and applies one with `model = _base_.<name>`. `_delete_` replaces the SN dict
# of the base, whose SN-only keys would otherwise reach GN/BCN. The global-pooling branch keeps SyncBN.
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

# Micro-batch BCN (update rate = learning rate, via BCNUpdateRateHook) + WS with the authors' BCN
# formula 'bcn', as the manifest entry of their ResNet-50 BCN+WS backbone.
bcn_ws_norm_cfg = dict(_delete_=True, type='BCN', num_groups=32, estimate=True)
bcn_ws_conv_cfg = dict(type='WSConv', formula='bcn')
bcn_ws_model = dict(
    backbone=dict(
        conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg,
        init_cfg=dict(checkpoint='norm_plugins://resnet50_bcn_ws')),
    decode_head=dict(conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg),
    auxiliary_head=dict(conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg))
bcn_ws_hooks = [dict(type='BCNUpdateRateHook')]
