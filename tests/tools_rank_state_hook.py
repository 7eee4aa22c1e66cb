"""A hook for the distributed tools test: every rank writes its model state and the images it saw."""
import os.path as osp

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class RankStateDumpHook(Hook):

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.image_ids = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        # mmdet samples carry img_id, mmseg ones only their path.
        self.image_ids += [sample.metainfo.get('img_id', sample.metainfo.get('img_path'))
                           for sample in data_batch['data_samples']]

    def after_run(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        torch.save({'state_dict': model.state_dict(), 'image_ids': self.image_ids,
                    'wrapper': type(runner.model).__name__, 'backend': torch.distributed.get_backend()},
                   osp.join(self.out_dir, f'rank{runner.rank}.pth'))
