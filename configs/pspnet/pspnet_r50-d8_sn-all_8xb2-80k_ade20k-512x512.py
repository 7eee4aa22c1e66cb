# PSPNet R50-D8 + SN on ADE20K (SN paper Sec. 4.3): 8 GPUs x 2 crops of 512x512 (mmseg's pipeline; the
# paper resizes to 450x450), poly lr (power 0.9), 80k iterations (mmseg's schedule; the paper runs 100k).
_base_ = [
    '../_base_/models/pspnet_r50-d8_sn.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))
train_dataloader = dict(batch_size=2)
optim_wrapper = _base_.norm_no_decay_optim_wrapper
# Batch-average statistics before every validation, and in the checkpoint saved with it (SN paper Sec. 3,
# "Inference"): K = 1264 batches x 8 GPUs x 2 images = the 20,210 training images once. See configs/README.md.
custom_hooks = [dict(type='PreciseStatsHook', num_batches=1264)]
