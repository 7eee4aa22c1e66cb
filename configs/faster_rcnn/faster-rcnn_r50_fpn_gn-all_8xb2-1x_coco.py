# GN(32) baseline with the 4conv1fc head at 1x (mmdet's gn/ configs are 2x and 3x only). The Detectron
# GN backbone expects BGR input with Caffe-style mean and no std, as in mmdet's GN recipe.
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_8xb2-1x_coco.py'
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    data_preprocessor=dict(mean=[103.530, 116.280, 123.675], std=[1.0, 1.0, 1.0], bgr_to_rgb=False),
    backbone=dict(norm_cfg=norm_cfg, init_cfg=dict(checkpoint='open-mmlab://detectron/resnet50_gn')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
