# Mask R-CNN R50-FPN + SN in backbone (stem, blocks, shortcuts), FPN, 4conv1fc box head and mask head on
# Cityscapes instance segmentation, 8 GPUs x 2 images; backbone: the authors' ResNet-50 SN (8, 2).
_base_ = [
    '../_base_/mask-rcnn_r50_fpn_4conv1fc_8xb2-1x_cityscapes.py', '../_base_/models/mask-rcnn_norm_variants.py'
]
model = _base_.sn_model
# Batch-average statistics before every validation, and in the checkpoint saved with it (SN paper Sec. 3,
# "Inference"): K = 186 batches x 8 GPUs x 2 images = the 2975 training images once. See configs/README.md.
custom_hooks = [dict(type='PreciseStatsHook', num_batches=186)]
