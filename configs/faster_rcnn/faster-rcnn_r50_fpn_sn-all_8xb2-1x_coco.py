# SN in the backbone (stem, every block, shortcuts), FPN and box head (RPN head has no norm).
# Backbone: the authors' ResNet-50 SN pretrained at (8 GPUs, 2 images), the finetuning batch.
_base_ = '../_base_/faster-rcnn_r50_fpn_4conv1fc_8xb2-1x_coco.py'
# The authors' SN, as in the pretrained backbone (its manifest entry): unbiased instance variance,
# running-statistics momentum 0.003 (0.997 kept).
norm_cfg = dict(type='SN', unbiased_instance_var=True, momentum=0.003)
model = dict(
    # mmdet's norm_eval=True only freezes _BatchNorm, so SN trains either way; the papers finetune it unfrozen.
    backbone=dict(norm_cfg=norm_cfg, norm_eval=False, init_cfg=dict(checkpoint='norm_plugins://resnet50_sn_8x2')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
# Batch-average statistics before every validation, and in the checkpoint saved with it (SN paper Sec. 3,
# "Inference"): K = 3125 batches x 8 GPUs x 2 images = the paper's 50k images. See configs/README.md.
custom_hooks = [dict(type='PreciseStatsHook', num_batches=3125)]
