# SyncSN: SN whose batch statistics are synchronized over the 8 GPUs (the SN paper's best results).
_base_ = ['./pspnet_r50-d8_sn-all_8xb2-80k_cityscapes-769x769.py', '../_base_/models/seg_norm_variants.py']
model = _base_.syncsn_model
