"""The normalizers compared by the batch-size study, as mmcv ``norm_cfg``/``conv_cfg`` pairs.

Every entry goes through mmcv's registry (``ConvModule``/``build_norm_layer``/``build_conv_layer``),
so the study trains exactly the layers a config would build.
"""
from typing import Dict, Optional, Sequence

#: Study order: the batch-dependent baseline, the batch-independent ones, then the plug-in layers.
NORMALIZERS = ('BN', 'GN', 'GN+WS', 'SN', 'SyncSN', 'SN-G2', 'SSN', 'BCN+WS')
#: Those built from SN's layer (softmax or SparsestMax ratios), whose ratios the study reports.
SN_FAMILY = ('SN', 'SyncSN', 'SN-G2', 'SSN')
#: Channel groups of the group-SN row (TPAMI paper Sec. 3: 77.2% top-1 with two groups).
GROUP_SN_GROUPS = 2
#: The subset a detector from scratch is trained with by default (SN paper Table 4, lower part).
DETECTION_NORMALIZERS = ('BN', 'GN', 'SN')


def layer_cfgs(name: str, num_groups: int) -> Dict[str, Optional[dict]]:
    """``dict(norm_cfg=..., conv_cfg=...)`` of the normalizer ``name``.

    ``BN`` is plain per-process BatchNorm (the papers' BN at (GPUs, images per GPU)); ``SyncSN``
    shares only its BN statistics across processes. ``SN-G2`` is group SN with two channel groups;
    ``SSN`` sparse SN, whose radius the trainer grows from 0 to 1 over the run (SSNRadiusHook's
    schedule). ``BCN+WS`` is the micro-batch BCN of Algorithm 1 (``estimate=True``), whose update
    rate the trainer sets to the learning rate.
    """
    ws = dict(type='WSConv')
    cfgs = {
        'BN': (dict(type='BN'), None),
        'GN': (dict(type='GN', num_groups=num_groups), None),
        'GN+WS': (dict(type='GN', num_groups=num_groups), ws),
        'SN': (dict(type='SN'), None),
        'SyncSN': (dict(type='SyncSN'), None),
        'SN-G2': (dict(type='SN', ratio_groups=GROUP_SN_GROUPS), None),
        'SSN': (dict(type='SSN'), None),
        'BCN+WS': (dict(type='BCN', num_groups=num_groups, estimate=True), ws),
    }
    if name not in cfgs:
        raise ValueError(f'unknown normalizer {name!r}; choose from {", ".join(NORMALIZERS)}')
    norm_cfg, conv_cfg = cfgs[name]
    return dict(norm_cfg=norm_cfg, conv_cfg=conv_cfg)


def check_normalizers(names: Sequence[str], allowed: Sequence[str] = NORMALIZERS) -> tuple:
    """``names`` as a tuple, or a ValueError naming the unknown ones and the choices."""
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f'unknown normalizer(s) {", ".join(unknown)}; choose from {", ".join(allowed)}')
    if not names:
        raise ValueError(f'no normalizer selected; choose from {", ".join(allowed)}')
    return tuple(names)
