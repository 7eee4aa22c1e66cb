"""PreciseStatsHook as a recipe runs it: DeepLabV3 R50-D8 + SN on ADE20K (the recipe's model, hook,
dataset class and training pipeline, on a tiny ADE20K in the real layout, sizes scaled down). After one
training iteration and the validation that follows it, every SN layer's running statistics are the
float64 average of the batch statistics of exactly the batches the hook drew, under the weights of
that moment, with the authors' unbiased instance variance (``unbiased_instance_var=True``):

    mean_k = E_{n,l}[x],   var_k = E_n[var_unbiased_l(x) + E_l[x]^2] - mean_k^2,
    running_mean = 1/K sum_k mean_k,   running_var = 1/K sum_k var_k
"""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import norm_plugins  # noqa: F401
from norm_plugins.layers import SwitchableNorm
from recipe_datasets import make_ade20k

RECIPE = Path(__file__).resolve().parents[1] / 'configs/deeplabv3/deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py'
K = 2


def _tiny_recipe(data_root: Path, work_dir: Path) -> Config:
    """The recipe with only the data, sizes (ADE20K's 2048x512 / 512 crop scaled down 8x), schedule
    (1 iteration, validated), K and the pretrained backbone (off) changed."""
    cfg = Config.fromfile(str(RECIPE))
    train, val = cfg.train_dataloader.dataset, cfg.val_dataloader.dataset
    assert [t.type for t in train.pipeline][2:4] == ['RandomResize', 'RandomCrop']
    train.pipeline[2].scale, train.pipeline[3].crop_size = (256, 64), (64, 64)
    assert val.pipeline[1].type == 'Resize'
    val.pipeline[1].scale = (256, 64)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = str(data_root)
        loader.update(num_workers=0, persistent_workers=False)
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.backbone.init_cfg = None
    cfg.train_cfg.update(max_iters=1, val_interval=1)
    assert [h.type for h in cfg.custom_hooks] == ['PreciseStatsHook']
    cfg.custom_hooks[0].num_batches = K
    cfg.work_dir = str(work_dir)
    return cfg


def _float64_batch_average(model, batches):
    """Per SN layer, the float64 average over ``batches`` of (mean_k, var_k) of the module docstring,
    the model set up as the hook sets it (eval, SN layers training)."""
    model = copy.deepcopy(model).double().eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SwitchableNorm)}
    stats = {name: [] for name in layers}

    def record(name):
        def hook(module, args):
            x = args[0].double()
            instance_mean = x.mean((2, 3))
            mean = instance_mean.mean(0)
            var = (x.var((2, 3), unbiased=True) + instance_mean.square()).mean(0) - mean.square()
            stats[name].append((mean, var))
        return hook

    for name, layer in layers.items():
        assert layer.unbiased_instance_var
        layer.train()
        layer.register_forward_pre_hook(record(name))
    with torch.no_grad():
        for batch in batches:
            data = model.data_preprocessor(batch, True)
            model(data['inputs'].double(), data['data_samples'], mode='loss')
    return {name: tuple(torch.stack([s[i] for s in values]).mean(0) for i in (0, 1))
            for name, values in stats.items() if values}


@pytest.mark.slow
def test_recipe_hook_sets_sn_statistics_to_the_float64_batch_average(tmp_path):
    cfg = _tiny_recipe(make_ade20k(tmp_path / 'ade', num_train=4), tmp_path / 'work')
    runner = Runner.from_cfg(cfg)
    hook = next(h for h in runner.hooks if type(h).__name__ == 'PreciseStatsHook')
    drawn, at_validation = [], []
    batch_iterator = hook._batch_iterator

    def recording_iterator(runner):
        for batch in batch_iterator(runner):
            drawn.append(copy.deepcopy(batch))
            yield batch

    hook._batch_iterator = lambda r: recording_iterator(r)
    validate = runner.val_loop.run

    def recording_validation():
        at_validation.append(copy.deepcopy(runner.model))  # weights and statistics the validation used
        return validate()

    runner.val_loop.run = recording_validation
    runner.train()

    assert len(drawn) == K and len(at_validation) == 1
    model = at_validation[0]
    expected = _float64_batch_average(model, drawn)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SwitchableNorm)}
    assert len(layers) == 53 + 5 + 1 and expected.keys() == layers.keys()  # backbone, ASPP head, FCN head
    for name, (mean, var) in expected.items():
        layer = layers[name]
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=2e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=2e-4, atol=1e-5, msg=name)
        assert int(layer.num_batches_tracked) == K and layer.momentum == 0.003
