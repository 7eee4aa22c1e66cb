# GN(32) + Weight Standardization on every convolution with a norm after it. The JHU GN+WS backbone was
# trained with the authors' WS formula (unbiased std, eps outside the root): formula='convws' matches it.
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_8xb2-1x_coco.py'
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
conv_cfg = dict(type='WSConv', formula='convws')
model = dict(
    backbone=dict(
        conv_cfg=conv_cfg, norm_cfg=norm_cfg, init_cfg=dict(checkpoint='open-mmlab://jhu/resnet50_gn_ws')),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))
