"""Reading checkpoints and building the model of a config, for the analysis and deployment tools."""
import os.path as osp
from typing import Optional

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import load_checkpoint
from torch import nn

from ..runner.checkpoint_safety import mmengine_checkpoint_globals


def read_checkpoint(path: str) -> dict:
    """A checkpoint file as a dict with a ``state_dict`` entry (mmengine's layout).

    Accepts mmengine checkpoints, ``{'state_dict': ...}`` wrappers and bare state dicts; loads with
    torch's safe unpickler (mmengine's message-hub objects allowed).
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}; pass an existing .pth file')
    with mmengine_checkpoint_globals():
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict')
    if 'state_dict' not in checkpoint:
        checkpoint = {'state_dict': checkpoint}
    return checkpoint


def read_state_dict(path: str) -> dict:
    return read_checkpoint(path)['state_dict']


def load_config(config: str, cfg_options: Optional[dict] = None) -> Config:
    if not osp.isfile(config):
        raise FileNotFoundError(f'config not found: {config}; pass the config the checkpoint was trained with')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model(config, checkpoint: Optional[str] = None, cfg_options: Optional[dict] = None) -> nn.Module:
    """The model of ``config`` (a path or a :class:`Config`), with ``checkpoint``'s weights if given.

    Loading is strict: a checkpoint of another architecture fails with the keys that differ.
    """
    cfg = config if isinstance(config, Config) else load_config(config, cfg_options)
    scope = cfg.get('default_scope')
    if scope is None:
        raise ValueError('the config sets no default_scope; inherit an mmdet or mmseg base config or set '
                         "default_scope = 'mmdet' or 'mmseg'")
    # Building does not initialize weights (no pretrained download): they come from the checkpoint.
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
    if checkpoint is not None:
        with mmengine_checkpoint_globals():
            load_checkpoint(model, checkpoint, map_location='cpu', strict=True, revise_keys=[(r'^module\.', '')])
    return model
