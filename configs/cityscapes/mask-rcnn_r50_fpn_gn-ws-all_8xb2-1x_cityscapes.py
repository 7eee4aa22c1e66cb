# GN(32) + WS on every convolution with a norm after it (backbone, FPN, box and mask heads); backbone:
# the JHU ResNet-50 GN+WS.
_base_ = [
    '../_base_/mask-rcnn_r50_fpn_4conv1fc_8xb2-1x_cityscapes.py', '../_base_/models/mask-rcnn_norm_variants.py'
]
model = _base_.gn_ws_model
