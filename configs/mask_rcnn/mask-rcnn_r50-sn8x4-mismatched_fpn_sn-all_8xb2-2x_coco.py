# Pretraining-batch ablation (SN-distinct paper Table 3): the flagship finetuned at 2 images per GPU from
# the ResNet-50 SN pretrained at (8, 4), deliberately not matching. The papers' advice is to pretrain and
# finetune at comparable batch sizes (BN ratios learned at 4 per GPU are unstable at 2 per GPU).
_base_ = '../mask_rcnn_sn.py'
model = dict(backbone=dict(init_cfg=dict(checkpoint='norm_plugins://resnet50_sn_8x4')))
