# Group SN: DeepLabV3 R50-D8 + SN on ADE20K (8 GPUs x 2 crops of 512x512, 80k iterations) with two channel
# groups per SN layer, each choosing its own normalizers (TPAMI paper Sec. 3), from the SN (8, 2) backbone
# with its ratios repeated over the groups (norm_plugins://resnet50_sn_8x2_g2).
_base_ = ['./deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py', '../_base_/models/seg_norm_variants.py']
model = _base_.sn_g2_model
