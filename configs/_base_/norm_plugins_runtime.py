# Shared by every recipe. custom_imports makes upstream tools/train.py and `mim train` load the plug-in
# (SN, SyncSN, BCN, WSConv, the heads, the optimizer-wrapper constructor and the hooks).
custom_imports = dict(imports=['norm_plugins'], allow_failed_imports=False)

# The papers' detection/segmentation protocol: weight decay on weights only, 0 on every norm layer's
# gamma/beta (plug-in norms included) and on SN's mixture logits. Recipes set
# `optim_wrapper = _base_.norm_no_decay_optim_wrapper` (merged into the schedule's optim_wrapper).
norm_no_decay_optim_wrapper = dict(
    constructor='NormAwareOptimWrapperConstructor',
    paramwise_cfg=dict(norm_decay_mult=0., mixture_decay_mult=0.))

# SSN recipes: the ratio logits trained as the SSN code trains them (Sparse_SwitchNorm train_imagenet.py):
# at a tenth of the learning rate, without weight decay, their gradients clipped together to norm 1;
# with `custom_hooks` holding SSNRadiusHook (the radius from the training progress).
ssn_optim_wrapper = dict(
    constructor='NormAwareOptimWrapperConstructor',
    paramwise_cfg=dict(norm_decay_mult=0., mixture_decay_mult=0., mixture_lr_mult=0.1,
                       mixture_clip_grad=dict(max_norm=1.0)))
