"""mmseg decode heads whose branches after global average pooling take their own normalizer.

After ``AdaptiveAvgPool2d(1)`` every channel holds one value per image. SN's instance statistics
are then degenerate (mean = x, variance 0: the IN part outputs 0 whatever the input) and its layer
statistics come from a single vector; the SN papers' practice list says not to put SN there. In
mmseg's ``ASPPHead`` (image-pooling branch) and ``PSPHead`` (the 1x1 bin of the pyramid) that
branch shares ``norm_cfg`` with the rest of the head, so these variants add ``pool_norm_cfg`` for it
and keep everything else, including state-dict keys, identical to the upstream heads.

The default, SyncBN, normalizes the pooled vectors over the whole synchronized batch (16 images at
8 GPUs x 2), the only statistics that are meaningful there; mmengine's Runner turns it into BN
when training is not distributed.
"""
import copy
from typing import Optional

from mmcv.cnn import ConvModule
from mmseg.models.decode_heads import ASPPHead, PSPHead

POOL_NORM_CFG = dict(type='SyncBN', requires_grad=True)


class PoolNormASPPHead(ASPPHead):
    """DeepLabV3's ``ASPPHead`` with ``pool_norm_cfg`` for the image-pooling branch.

    Args:
        pool_norm_cfg: norm config of the 1x1 convolution after global average pooling;
            ``None`` leaves that convolution unnormalized (with a bias). Default SyncBN.
        **kwargs: as ``ASPPHead`` (``norm_cfg`` applies to every other branch).
    """

    def __init__(self, pool_norm_cfg: Optional[dict] = POOL_NORM_CFG, **kwargs):
        super().__init__(**kwargs)
        self.pool_norm_cfg = copy.deepcopy(pool_norm_cfg)
        self.image_pool[1] = _pooled_conv(self)


class PoolNormPSPHead(PSPHead):
    """PSPNet's ``PSPHead`` with ``pool_norm_cfg`` for the pyramid bin of scale 1 (global pooling).

    Args:
        pool_norm_cfg: norm config of the 1x1 convolution of the scale-1 bin; ``None`` leaves it
            unnormalized (with a bias). Default SyncBN. Larger bins keep ``norm_cfg``.
        **kwargs: as ``PSPHead``.
    """

    def __init__(self, pool_norm_cfg: Optional[dict] = POOL_NORM_CFG, **kwargs):
        super().__init__(**kwargs)
        self.pool_norm_cfg = copy.deepcopy(pool_norm_cfg)
        for index, scale in enumerate(self.pool_scales):
            if scale == 1:
                self.psp_modules[index][1] = _pooled_conv(self)


def _pooled_conv(head) -> ConvModule:
    """The 1x1 convolution of a global-pooling branch, normalized with ``head.pool_norm_cfg``."""
    return ConvModule(head.in_channels, head.channels, 1, conv_cfg=head.conv_cfg,
                      norm_cfg=head.pool_norm_cfg, act_cfg=head.act_cfg)
