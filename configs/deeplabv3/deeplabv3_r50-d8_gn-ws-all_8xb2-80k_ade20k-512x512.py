# GN(32) + WS in backbone and heads; backbone: the JHU ResNet-50 GN+WS.
_base_ = ['./deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py', '../_base_/models/seg_norm_variants.py']
model = _base_.gn_ws_model
custom_hooks = _base_.gn_ws_hooks
