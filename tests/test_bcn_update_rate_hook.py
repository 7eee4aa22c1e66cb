"""BCNUpdateRateHook: r follows the scheduled learning rate under a real mmengine Runner."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from norm_plugins import BatchChannelNorm, BCNUpdateRateHook


class TinyBCNModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.bcn = BatchChannelNorm(4, num_groups=2, estimate=True, update_rate=0.5)
        self.head = nn.Linear(4, 1)
        self.rates_seen = []

    def forward(self, inputs, targets=None, mode='tensor'):
        if self.training:
            self.rates_seen.append(float(self.bcn.update_rate))
        out = self.head(self.bcn(self.conv(inputs)).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=F.mse_loss(out, targets))
        return out


class TinyDataset(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        return dict(inputs=torch.randn(2, 3, 3, generator=gen) + 1, targets=torch.randn(1, generator=gen))


@pytest.mark.slow
def test_rate_follows_warmup_and_step_schedule_under_runner(tmp_path):
    model = TinyBCNModel()
    runner = Runner(
        model=model,
        work_dir=str(tmp_path),
        train_dataloader=dict(dataset=TinyDataset(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=8),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.25, by_epoch=False, begin=0, end=5),
            dict(type='MultiStepLR', milestones=[6], gamma=0.1, by_epoch=False),
        ],
        custom_hooks=[dict(type='BCNUpdateRateHook')],
        default_hooks=dict(checkpoint=None),
    )
    runner.train()
    # Linear warmup from 0.25 * 0.1 reaching 0.1 at iteration end - 1 = 4 (steps of 0.01875), then
    # divided by 10 from iteration 6 on.
    expected = [0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1, 0.01, 0.01]
    assert model.rates_seen == pytest.approx(expected, rel=1e-5)
    assert float(model.bcn.update_rate) == pytest.approx(0.01, rel=1e-5)
    assert not torch.equal(model.bcn.estimated_mean, torch.zeros(4))


def _runner_with(model, optim_wrapper):
    return SimpleNamespace(model=model, optim_wrapper=optim_wrapper)


def test_factor_and_parameter_group_of_each_layer():
    model = nn.Sequential(BatchChannelNorm(4, num_groups=2, estimate=True),
                          BatchChannelNorm(4, num_groups=2, estimate=True, affine=False),
                          BatchChannelNorm(4, num_groups=2))
    optimizer = torch.optim.SGD([{'params': [nn.Parameter(torch.zeros(1))], 'lr': 0.2},
                                 {'params': list(model[0].parameters()), 'lr': 0.05}], lr=0.1)
    hook = BCNUpdateRateHook(factor=0.5)
    runner = _runner_with(model, OptimWrapper(optimizer))
    hook.before_train(runner)
    hook.before_train_iter(runner, 0)
    assert float(model[0].update_rate) == pytest.approx(0.025)  # its own group's lr
    assert float(model[1].update_rate) == pytest.approx(0.1)  # no parameters: the first group
    assert not hasattr(model[2], 'update_rate')  # large batch: untouched

    wrappers = OptimWrapperDict(a=OptimWrapper(torch.optim.SGD(model[0].parameters(), lr=0.3)))
    BCNUpdateRateHook().before_train_iter(_runner_with(model, wrappers), 0)
    assert float(model[0].update_rate) == pytest.approx(0.3)


def test_rate_above_one_and_bad_factor_raise():
    model = nn.Sequential(BatchChannelNorm(4, num_groups=2, estimate=True))
    runner = _runner_with(model, OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.5)))
    with pytest.raises(ValueError, match=r'update_rate must be a number in \[0, 1\]'):
        BCNUpdateRateHook(factor=4).before_train_iter(runner, 0)
    with pytest.raises(ValueError, match='factor must be a non-negative number'):
        BCNUpdateRateHook(factor=-1)


def test_warns_without_micro_batch_layers_and_is_registered():
    model = nn.Sequential(BatchChannelNorm(4, num_groups=2))
    with pytest.warns(UserWarning, match='no BCN layer with estimate=True'):
        BCNUpdateRateHook().before_train(_runner_with(model, None))
    assert isinstance(HOOKS.build(dict(type='BCNUpdateRateHook', factor=2.0)), BCNUpdateRateHook)
