# Mask R-CNN R50-FPN as the SN and WS/BCN papers ran it: a 4conv1fc box head (mmdet's default 2fc head
# has no convolution to normalize), 8 GPUs x 2 images, lr 0.02, 1x. Variants choose the norms.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './norm_plugins_runtime.py']

model = dict(roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256)))
train_dataloader = dict(batch_size=2)
optim_wrapper = _base_.norm_no_decay_optim_wrapper
