# SN with batch statistics synchronized over all GPUs (IN and LN stay per image); same places, backbone,
# norm_eval=False and batch-average evaluation as the SN recipe.
_base_ = './faster-rcnn_r50_fpn_sn-all_8xb2-1x_coco.py'
norm_cfg = dict(type='SyncSN', unbiased_instance_var=True, momentum=0.003)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
