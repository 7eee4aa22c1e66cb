# Micro-batch BCN (Algorithm 1: estimated batch statistics with update rate r = the learning rate, set by
# BCNUpdateRateHook) + WS on every convolution with a norm after it, in the same places as GN+WS.
# Backbone: the authors' ResNet-50 BCN+WS (large-batch BCN; WS formula 'bcn', the authors' BCN code, as its
# manifest entry).
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_8xb2-1x_coco.py'
norm_cfg = dict(type='BCN', num_groups=32, estimate=True)
conv_cfg = dict(type='WSConv', formula='bcn')
model = dict(
    # mmdet's norm_eval=True only freezes _BatchNorm: BCN updates its estimates at every training step
    # (Algorithm 1) either way, and norm_eval=False says so.
    backbone=dict(
        conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False,
        init_cfg=dict(checkpoint='norm_plugins://resnet50_bcn_ws')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
custom_hooks = [dict(type='BCNUpdateRateHook')]
