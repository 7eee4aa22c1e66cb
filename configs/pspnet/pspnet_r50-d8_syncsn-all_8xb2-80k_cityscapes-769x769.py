# SyncSN: SN whose batch statistics are synchronized over the 8 GPUs (the SN paper's best results).
_base_ = './pspnet_r50-d8_sn-all_8xb2-80k_cityscapes-769x769.py'
norm_cfg = dict(type='SyncSN', unbiased_instance_var=True, momentum=0.003)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
