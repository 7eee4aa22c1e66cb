# The synthetic shapes dataset (norm_plugins/demo/shapes.py) as mmseg semantic maps
# (custom-dataset layout img_dir/ann_dir), with an iteration-based schedule for two CPU cores.
_base_ = ['mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['norm_plugins'], allow_failed_imports=False)

data_root = 'data/shapes/'
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[(0, 0, 0), (220, 20, 60), (0, 128, 255), (255, 200, 0)])
shapes_dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.png',
               seg_map_suffix='.png', reduce_zero_label=False)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(**shapes_dataset, data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**shapes_dataset, data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=max_iters, eta_min_ratio=0.01),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    # No weight decay on any norm's affine parameters nor on SN's mixture logits (the SN papers).
    constructor='NormAwareOptimWrapperConstructor',
    paramwise_cfg=dict(norm_decay_mult=0.0, mixture_decay_mult=0.0))
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook', draw=False))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
