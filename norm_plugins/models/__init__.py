"""Decode heads built on mmseg's. They are registered as builders that import mmseg on first use, so
that ``import norm_plugins`` stays light for detection-only users; the classes themselves live in
:mod:`norm_plugins.models.decode_heads`."""


def build_pool_norm_aspp_head(**kwargs):
    """``type='PoolNormASPPHead'``: see :class:`norm_plugins.models.decode_heads.PoolNormASPPHead`."""
    from .decode_heads import PoolNormASPPHead
    return PoolNormASPPHead(**kwargs)


def build_pool_norm_psp_head(**kwargs):
    """``type='PoolNormPSPHead'``: see :class:`norm_plugins.models.decode_heads.PoolNormPSPHead`."""
    from .decode_heads import PoolNormPSPHead
    return PoolNormPSPHead(**kwargs)


__all__ = ['build_pool_norm_aspp_head', 'build_pool_norm_psp_head']
