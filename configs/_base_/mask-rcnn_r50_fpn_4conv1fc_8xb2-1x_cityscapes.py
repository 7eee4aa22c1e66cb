# mmdet's Cityscapes instance-segmentation Mask R-CNN R50-FPN (its dataset, pipelines, CocoMetric +
# CityScapesMetric evaluators and 8-epoch schedule over the training set repeated 8 times) with the
# 4conv1fc box head of the COCO recipes, at 8 GPUs x 2 images. Variants choose the norms.
_base_ = ['mmdet::cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py', './norm_plugins_runtime.py']

model = dict(roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256)))
train_dataloader = dict(batch_size=2)
# mmdet's lr 0.01 is for 8 GPUs x 1 image: twice the batch, twice the lr (linear scaling rule).
optim_wrapper = dict(_base_.norm_no_decay_optim_wrapper, optimizer=dict(lr=0.02))
# mmdet starts from its COCO-trained Mask R-CNN, whose frozen-BN backbone and 2fc box head do not fit
# these norms; the recipes start from the ImageNet backbone of their normalizer instead (variants set it).
load_from = None
