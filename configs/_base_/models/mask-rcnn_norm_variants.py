# Norm swaps for Mask R-CNN R50-FPN with the 4conv1fc box head (COCO and Cityscapes recipes): backbone, FPN,
# box head and mask head (the RPN head has no norm). A recipe applies one with `model = _base_.<name>_model`.
# Every backbone gets a whole `init_cfg` (`_delete_`): mmdet's Cityscapes config sets it to None.
#
# norm_eval=False where SN (group SN, SSN), SyncSN or BCN train: mmdet's ResNet(norm_eval=True) only freezes _BatchNorm
# layers, so these train either way (the SN papers finetune SN unfrozen; BCN's Algorithm 1 updates its
# estimates at every training step), and the flag says so.
# The authors' SN, as in the pretrained backbone (its manifest entry): unbiased instance variance,
# running-statistics momentum 0.003 (0.997 kept).
sn_norm_cfg = dict(type='SN', unbiased_instance_var=True, momentum=0.003)
sn_model = dict(
    backbone=dict(
        norm_cfg=sn_norm_cfg, norm_eval=False,
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='norm_plugins://resnet50_sn_8x2')),
    neck=dict(norm_cfg=sn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=sn_norm_cfg), mask_head=dict(norm_cfg=sn_norm_cfg)))

# Group SN (TPAMI paper Sec. 3, "Variants of SN"): the channels of every SN layer in two contiguous groups,
# each with its own mean and variance ratios. The authors released no group-SN backbone; resnet50_sn_8x2_g2
# is the SN (8, 2) one with each layer's ratios repeated over the two groups (it computes exactly SN (8, 2)
# until finetuning lets the groups choose apart).
sn_g2_norm_cfg = dict(type='SN', unbiased_instance_var=True, momentum=0.003, ratio_groups=2)
sn_g2_model = dict(
    backbone=dict(
        norm_cfg=sn_g2_norm_cfg, norm_eval=False,
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='norm_plugins://resnet50_sn_8x2_g2')),
    neck=dict(norm_cfg=sn_g2_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=sn_g2_norm_cfg), mask_head=dict(norm_cfg=sn_g2_norm_cfg)))

# Sparse SN (SSN, CVPR 2019): SparsestMax ratios that become one-hot and freeze while the radius grows
# (SSNRadiusHook and the SSN optimizer settings: see norm_plugins_runtime.py). The authors' SSN2d, as in
# their ResNet-50 SSN pretrained at (8, 2) (its manifest entry): unbiased instance variance, momentum 0.003.
# The backbone's layers arrive frozen as pretrained; the new ones in FPN and heads start free.
ssn_norm_cfg = dict(type='SSN', unbiased_instance_var=True, momentum=0.003)
ssn_model = dict(
    backbone=dict(
        norm_cfg=ssn_norm_cfg, norm_eval=False,
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='norm_plugins://resnet50_ssn_8x2')),
    neck=dict(norm_cfg=ssn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=ssn_norm_cfg), mask_head=dict(norm_cfg=ssn_norm_cfg)))

# SN whose batch statistics are synchronized over all GPUs (IN and LN stay per image); same backbone.
syncsn_norm_cfg = dict(type='SyncSN', unbiased_instance_var=True, momentum=0.003)
syncsn_model = dict(
    backbone=dict(
        norm_cfg=syncsn_norm_cfg, norm_eval=False,
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='norm_plugins://resnet50_sn_8x2')),
    neck=dict(norm_cfg=syncsn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=syncsn_norm_cfg), mask_head=dict(norm_cfg=syncsn_norm_cfg)))

# Micro-batch BCN (Algorithm 1, update rate = learning rate via BCNUpdateRateHook) + WS with the authors'
# BCN formula 'bcn', as the manifest entry of their ResNet-50 BCN+WS backbone.
bcn_ws_norm_cfg = dict(type='BCN', num_groups=32, estimate=True)
bcn_ws_conv_cfg = dict(type='WSConv', formula='bcn')
bcn_ws_model = dict(
    backbone=dict(
        conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg, norm_eval=False,
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='norm_plugins://resnet50_bcn_ws')),
    neck=dict(conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg),
    roi_head=dict(
        bbox_head=dict(conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg),
        mask_head=dict(conv_cfg=bcn_ws_conv_cfg, norm_cfg=bcn_ws_norm_cfg)))
bcn_ws_hooks = [dict(type='BCNUpdateRateHook')]

# GN(32) + WS with the authors' formula, which the JHU GN+WS backbone was trained with. GN is no
# _BatchNorm: mmdet's norm_eval stays as it is.
gn_ws_norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
gn_ws_conv_cfg = dict(type='WSConv', formula='convws')
gn_ws_model = dict(
    backbone=dict(
        conv_cfg=gn_ws_conv_cfg, norm_cfg=gn_ws_norm_cfg,
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='open-mmlab://jhu/resnet50_gn_ws')),
    neck=dict(conv_cfg=gn_ws_conv_cfg, norm_cfg=gn_ws_norm_cfg),
    roi_head=dict(
        bbox_head=dict(conv_cfg=gn_ws_conv_cfg, norm_cfg=gn_ws_norm_cfg),
        mask_head=dict(conv_cfg=gn_ws_conv_cfg, norm_cfg=gn_ws_norm_cfg)))
