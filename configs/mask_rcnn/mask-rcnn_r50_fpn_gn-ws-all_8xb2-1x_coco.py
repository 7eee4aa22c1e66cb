# GN(32) + Weight Standardization on every convolution with a norm after it. The JHU GN+WS backbone was
# trained with the authors' WS formula (unbiased std, eps outside the root): formula='convws' matches it.
_base_ = ['../_base_/mask-rcnn_r50_fpn_4conv1fc_8xb2-1x_coco.py', '../_base_/models/mask-rcnn_norm_variants.py']
model = _base_.gn_ws_model
