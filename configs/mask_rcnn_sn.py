# The flagship recipe (SN paper Sec. 4.2, Table 6): Mask R-CNN R50-FPN with SN in the backbone (stem,
# every block, shortcuts), FPN, 4conv1fc box head and mask head; COCO 2017; 8 GPUs x 2 images, lr 0.02,
# 2x schedule; backbone: the authors' ResNet-50 SN pretrained at (8, 2). Validation (and the checkpoint saved
# with it) uses batch-average statistics over 3125 training batches per GPU (PreciseStatsHook, inherited;
# off: --cfg-options custom_hooks=[]). See configs/README.md.
#   python tools/train.py configs/mask_rcnn_sn.py
_base_ = './mask_rcnn/mask-rcnn_r50_fpn_sn-all_8xb2-1x_coco.py'

max_epochs = 24
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[16, 22], gamma=0.1)
]
