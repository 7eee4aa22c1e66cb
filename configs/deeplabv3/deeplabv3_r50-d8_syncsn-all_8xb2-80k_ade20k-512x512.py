# SyncSN: SN whose batch statistics are synchronized over the 8 GPUs (the SN paper's best results).
_base_ = './deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py'
norm_cfg = dict(type='SyncSN', unbiased_instance_var=True, momentum=0.003)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
