# SyncSN: SN whose batch statistics are synchronized over all GPUs (IN and LN stay per image); same places,
# backbone, norm_eval=False and batch-average evaluation as the SN recipe.
_base_ = './mask-rcnn_r50_fpn_sn-all_8xb2-1x_coco.py'
model = _base_.syncsn_model
