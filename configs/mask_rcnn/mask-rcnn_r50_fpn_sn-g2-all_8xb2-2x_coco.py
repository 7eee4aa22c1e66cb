# Group-SN variant of the flagship (configs/mask_rcnn_sn.py, 2x, 8 GPUs x 2 images): every SN layer of
# backbone, FPN, box and mask heads with two channel groups, each choosing its own normalizers (TPAMI paper
# Sec. 3, "Variants of SN"; the paper reports only ImageNet, 77.2% top-1). Backbone: the SN (8, 2) ResNet-50
# with each layer's ratios repeated over the groups (norm_plugins://resnet50_sn_8x2_g2), as no group-SN
# backbone was released. Batch-average validation as the flagship.
_base_ = '../mask_rcnn_sn.py'
model = _base_.sn_g2_model
