"""A tiny mmengine model, dataset and Runner for hook tests (CPU, seconds)."""
import torch
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

from norm_plugins.layers import SwitchableNorm


class TinySNModel(BaseModel):
    """conv -> SN -> ReLU -> conv -> SN; loss = mean squared output."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), SwitchableNorm(4), nn.ReLU())
        self.neck = nn.Sequential(nn.Conv2d(4, 4, 1), SwitchableNorm(4))

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.neck(self.backbone(inputs))
        if mode == 'loss':
            return {'loss': (out - 1).square().mean()}
        if mode == 'predict':
            return [out]
        return out


class ConstantDataset(torch.utils.data.Dataset):
    """``length`` copies of one image: every batch has the same statistics."""

    def __init__(self, length=8):
        self.image = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(0))
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {'inputs': self.image.clone()}


class CountMetric(BaseMetric):

    def process(self, data_batch, data_samples):
        self.results.append(len(data_samples))

    def compute_metrics(self, results):
        return {'count': sum(results)}


class RandomImages(torch.utils.data.Dataset):
    """``length`` different images of shape ``size`` drawn from ``seed``, shifted by ``offset``."""

    def __init__(self, length=8, size=(2, 6, 6), seed=0, offset=0.0):
        self.images = torch.randn(length, *size, generator=torch.Generator().manual_seed(seed)) + offset

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {'inputs': self.images[index].clone()}


def tiny_runner(work_dir, custom_hooks, max_iters=4, val_interval=4, batch_size=2, model=None,
                train_dataset=None, val_dataset=None, with_test=False) -> Runner:
    """A Runner over ``model`` (default :class:`TinySNModel`) and the datasets (default
    :class:`ConstantDataset`), in order, ``batch_size`` images per batch; ``with_test`` adds a test
    loop over the validation data."""

    def loader(dataset):
        return dict(dataset=ConstantDataset() if dataset is None else dataset,
                    sampler=dict(type='DefaultSampler', shuffle=False), batch_size=batch_size, num_workers=0,
                    collate_fn=dict(type='default_collate'))

    torch.manual_seed(0)
    test = dict(test_dataloader=loader(val_dataset), test_evaluator=Evaluator([CountMetric()]),
                test_cfg=dict()) if with_test else {}
    return Runner(model=TinySNModel() if model is None else model, work_dir=str(work_dir),
                  train_dataloader=loader(train_dataset), val_dataloader=loader(val_dataset),
                  val_evaluator=Evaluator([CountMetric()]),
                  train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=val_interval),
                  val_cfg=dict(), optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                  custom_hooks=custom_hooks, default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1000)),
                  visualizer=dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]),
                  default_scope='mmengine', experiment_name=f'tiny_{id(custom_hooks)}', **test)
