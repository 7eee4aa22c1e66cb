# Micro-batch BCN (Algorithm 1: estimated batch statistics with update rate r = the learning rate, set by
# BCNUpdateRateHook) + WS on every convolution with a norm after it, in the same places as GN+WS.
# Backbone: the authors' ResNet-50 BCN+WS (large-batch BCN; WS formula 'bcn', the authors' BCN code, as its
# manifest entry), unfrozen (norm_eval=False).
_base_ = ['../_base_/mask-rcnn_r50_fpn_4conv1fc_8xb2-1x_coco.py', '../_base_/models/mask-rcnn_norm_variants.py']
model = _base_.bcn_ws_model
custom_hooks = _base_.bcn_ws_hooks
