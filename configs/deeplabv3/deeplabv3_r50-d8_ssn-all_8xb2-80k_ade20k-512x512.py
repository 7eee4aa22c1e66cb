# Sparse SN: DeepLabV3 R50-D8 on ADE20K (8 GPUs x 2 crops of 512x512, 80k iterations) with SSN (CVPR 2019)
# in the backbone and both heads, from the authors' ResNet-50 SSN pretrained at (8, 2). SSNRadiusHook and the
# SSN code's training of the ratio logits (lr/10, no weight decay, gradients clipped to norm 1); batch-average
# validation as the SN recipe (PreciseStatsHook first).
_base_ = ['./deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py', '../_base_/models/seg_norm_variants.py']
model = _base_.ssn_model
optim_wrapper = _base_.ssn_optim_wrapper
custom_hooks = [dict(type='PreciseStatsHook', num_batches=1264), dict(type='SSNRadiusHook')]
