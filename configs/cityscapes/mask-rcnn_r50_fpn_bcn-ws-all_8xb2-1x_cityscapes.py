# Micro-batch BCN + WS on every convolution with a norm after it (backbone, FPN, box and mask heads);
# backbone: the authors' ResNet-50 BCN+WS.
_base_ = [
    '../_base_/mask-rcnn_r50_fpn_4conv1fc_8xb2-1x_cityscapes.py', '../_base_/models/mask-rcnn_norm_variants.py'
]
model = _base_.bcn_ws_model
custom_hooks = _base_.bcn_ws_hooks
