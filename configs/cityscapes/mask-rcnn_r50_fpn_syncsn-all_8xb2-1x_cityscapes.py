# SyncSN: SN whose batch statistics are synchronized over the 8 GPUs; same places, backbone and
# batch-average evaluation as the SN recipe.
_base_ = './mask-rcnn_r50_fpn_sn-all_8xb2-1x_cityscapes.py'
model = _base_.syncsn_model
