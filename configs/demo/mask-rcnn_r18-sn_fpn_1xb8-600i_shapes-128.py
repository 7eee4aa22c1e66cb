# The README's demo: Mask R-CNN with Switchable Normalization in the backbone, FPN and both RoI
# heads, trained from scratch on the synthetic shapes dataset (tools/run_demo.sh).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './_base_/shapes_instance.py',
]
norm_cfg = dict(type='SN')
model = dict(
    backbone=dict(
        depth=18,
        base_channels=32,
        frozen_stages=-1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64, norm_cfg=norm_cfg),
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        # Shapes span ~20-75 px: anchors of 16-256 px on strides 4-64.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            in_channels=64,
            conv_out_channels=32,
            fc_out_channels=128,
            norm_cfg=norm_cfg,
            num_classes=3),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(in_channels=64, conv_out_channels=32, norm_cfg=norm_cfg, num_classes=3)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        # A few shapes per image: 32 sampled RoIs per image are plenty and keep the heads cheap.
        rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))
