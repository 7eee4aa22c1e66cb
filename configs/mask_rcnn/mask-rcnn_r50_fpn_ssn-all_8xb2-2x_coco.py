# Sparse-SN variant of the flagship (configs/mask_rcnn_sn.py, 2x, 8 GPUs x 2 images): SSN (CVPR 2019) in
# backbone, FPN, box and mask heads, from the authors' ResNet-50 SSN pretrained at (8, 2), the finetuning
# images per GPU. The ratios are trained as the SSN code trains them: SSNRadiusHook grows the SparsestMax
# radius with the training progress, so every new layer has frozen to one normalizer by 82% of training,
# and the logits learn at lr/10 without weight decay, their gradients clipped to norm 1. Batch-average
# validation as the flagship (PreciseStatsHook first: --cfg-options custom_hooks.0.num_batches=K).
_base_ = '../mask_rcnn_sn.py'
model = _base_.ssn_model
optim_wrapper = _base_.ssn_optim_wrapper
custom_hooks = [dict(type='PreciseStatsHook', num_batches=3125), dict(type='SSNRadiusHook')]
