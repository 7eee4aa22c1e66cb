# SN in the backbone (stem, every block, shortcuts), FPN, box head and mask head (RPN head has no norm).
# Backbone: the authors' ResNet-50 SN pretrained at (8 GPUs, 2 images), the finetuning batch; the authors'
# SN (unbiased instance variance, momentum 0.003), unfrozen (norm_eval=False).
_base_ = ['../_base_/mask-rcnn_r50_fpn_4conv1fc_8xb2-1x_coco.py', '../_base_/models/mask-rcnn_norm_variants.py']
model = _base_.sn_model
# Batch-average statistics before every validation, and in the checkpoint saved with it (SN paper Sec. 3,
# "Inference"): K = 3125 batches x 8 GPUs x 2 images = the paper's 50k images. See configs/README.md.
custom_hooks = [dict(type='PreciseStatsHook', num_batches=3125)]
