# PSPNet R50-D8 + SN on Cityscapes (SN paper Sec. 4.3, Table 8): 8 GPUs x 2 crops of 769x769 (mmseg's size;
# the paper crops 713x713), poly lr (power 0.9), 80k iterations (the TPAMI paper's 400 epochs: ~74k at 16 images).
_base_ = [
    '../_base_/models/pspnet_r50-d8_sn.py', 'mmseg::_base_/datasets/cityscapes_769x769.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (769, 769)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(align_corners=True),
    auxiliary_head=dict(align_corners=True),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(513, 513)))
train_dataloader = dict(batch_size=2)
optim_wrapper = _base_.norm_no_decay_optim_wrapper
# Batch-average statistics before every validation, and in the checkpoint saved with it (SN paper Sec. 3,
# "Inference"): K = 186 batches x 8 GPUs x 2 images = the 2975 training images once. See configs/README.md.
custom_hooks = [dict(type='PreciseStatsHook', num_batches=186)]
