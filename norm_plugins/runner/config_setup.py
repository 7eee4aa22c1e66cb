"""Turning command-line flags into an mmengine config, with one-line errors for missing inputs."""
import os.path as osp
from typing import List, Optional, Tuple

import torch
from mmengine.config import Config

from ..demo.shapes import META_FILE
from ..data_root import DataRootNotFoundError, check_data_root
from ..pretrained import SCHEME, PretrainedError, check_pretrained_config
from .errors import ToolError

REMOTE_PREFIXES = ('http://', 'https://', 's3://')


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile`` (importing ``custom_imports``) plus ``--cfg-options``."""
    if not osp.isfile(path):
        raise ToolError(f'config file not found: {path}; pass the path of an existing config, '
                        'e.g. configs/demo/mask-rcnn_r18-sn_fpn_1xb8-600i_shapes-128.py')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'default_scope' not in cfg:
        raise ToolError(f"config {path} sets no default_scope; inherit an mmdet or mmseg base config "
                        "(e.g. _base_ = 'mmdet::_base_/default_runtime.py') or set default_scope = 'mmdet' "
                        "or 'mmseg'")
    return cfg


def default_work_dir(config_path: str) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def _is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES) or '://' in path


def check_checkpoint(path: Optional[str], source: str, fix: str) -> None:
    """Fail early, in one line, when a local checkpoint does not exist (URLs and schemes pass)."""
    if path and not _is_remote(path) and not osp.isfile(path):
        raise ToolError(f'checkpoint not found: {path} ({source}); {fix}')


def apply_train_flags(cfg: Config, config_path: str, work_dir: Optional[str], amp: bool,
                      resume: Optional[str], launcher: str) -> None:
    """The meaning of mmdet/mmseg's train.py flags, applied to ``cfg`` in place."""
    cfg.launcher = launcher
    cfg.work_dir = work_dir or cfg.get('work_dir') or default_work_dir(config_path)
    if amp:
        if not torch.cuda.is_available():
            raise ToolError('--amp needs a CUDA GPU (mmengine\'s AmpOptimWrapper does not run on CPU); '
                            'drop --amp on this machine')
        if cfg.optim_wrapper.get('type', 'OptimWrapper') != 'AmpOptimWrapper':
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        check_checkpoint(resume, '--resume', 'give an existing checkpoint, or --resume alone to continue '
                                             f'from the latest one in {cfg.work_dir}')
        cfg.resume = True
        cfg.load_from = resume
    check_checkpoint(cfg.get('load_from'), 'load_from in the config',
                     'fix the path or pass --cfg-options load_from=None to train from scratch')


def check_dataset(cfg: Config, phases: Tuple[str, ...]) -> None:
    """:func:`norm_plugins.data_root.check_data_root` as a one-line :class:`ToolError`.

    For the demo's shapes dataset (incomplete until its ``shapes_meta.json`` is written) the fix
    is to generate it, which the message says.
    """
    shapes_root = _shapes_root(cfg, phases)
    if shapes_root and not osp.isfile(osp.join(shapes_root, META_FILE)):
        raise ToolError(f'dataset not found: {shapes_root} holds no complete shapes dataset; generate it with: '
                        f'python tools/make_shapes_dataset.py --out {shapes_root.rstrip("/")}')
    try:
        check_data_root(cfg, phases)
    except DataRootNotFoundError as error:
        raise ToolError(' '.join(line.strip() for line in str(error).splitlines())) from None


def _shapes_root(cfg: Config, phases: Tuple[str, ...]) -> Optional[str]:
    """The data_root of a shapes-demo dataset among ``phases``' loaders, if any."""
    for phase in phases:
        root = ((cfg.get(f'{phase}_dataloader') or {}).get('dataset') or {}).get('data_root') or ''
        if osp.basename(root.rstrip('/')) == 'shapes':
            return root
    return None


def check_pretrained_backbones(cfg: Config) -> List[str]:
    """The pretraining/finetuning batch check of every ``norm_plugins://`` backbone, before building.

    A backbone that cannot hold its checkpoint stops the run with a one-line error; a batch-size
    mismatch is a warning (the papers' finding is that it degrades results, not that it cannot
    work). Returns one line per comparison, for the run's log.
    """
    try:
        comparisons = check_pretrained_config(cfg)
    except PretrainedError as error:
        raise ToolError(' '.join(line.strip() for line in str(error).splitlines())) from None
    lines = []
    for c in comparisons:
        pretrain = 'unknown' if c.pretrain_images_per_gpu is None else c.pretrain_images_per_gpu
        verdict = ('matches' if c.matches else 'differs') if c.uses_batch_statistics else 'batch-independent norm'
        lines.append(f'{c.where} loads {SCHEME}{c.name}: pretrained with {pretrain} images per GPU, finetuning '
                     f'with {c.finetune_images_per_gpu} ({verdict})')
    return lines
