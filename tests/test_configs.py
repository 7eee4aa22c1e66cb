"""Every recipe under configs/ (configs/demo/ has its own tests): parses, follows the papers' protocol,
builds, puts the intended normalizers where its name says, gets the optimizer treatment, and trains one
step and predicts on CPU at a small input.

Expected layer counts come from the architectures, not from the configs: ResNet-50 has 53 normalized
convolutions (stem, 3 per bottleneck x 16, 4 shortcuts); FPN 8 (4 lateral, 4 output); the 4conv1fc box
head and the FCN mask head 4 each; DeepLabV3's ASPP head 4 branches + bottleneck (+ the image-pooling
branch), PSPNet's head 3 pyramid bins + bottleneck (+ the 1x1 bin); the auxiliary FCN head 1.

Batch-average evaluation (SN paper Sec. 3, "Inference"): the paper finds 50k training images as good as
all of ImageNet's, so SN and SyncSN recipes average K = min(50k, training images) / (8 GPUs x 2 images)
training batches per GPU before each validation.
"""
import argparse
import copy
import math
import re
import tempfile
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config, DictAction
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from mmengine.utils.dl_utils.parrots_wrapper import _BatchNorm, _InstanceNorm
from torch import nn

import norm_plugins  # noqa: F401
from norm_plugins import BatchChannelNorm, SparseSwitchableNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d
from norm_plugins.pretrained.config_checks import (PretrainingBatchMismatchWarning, check_pretrained_config,
                                                   pretrained_references)
from norm_plugins.pretrained.errors import PretrainedFileMissingError
from norm_plugins.pretrained.manifest import get_entry
from norm_plugins.pretrained.store import converted_file_name, file_sha256
from norm_plugins.runner.config_setup import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
RECIPES = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob('*.py')
                 if '_base_' not in p.parts and p.relative_to(CONFIG_DIR).parts[0] != 'demo')
FLAGSHIP = 'mask_rcnn_sn.py'
# Recipes whose model is another recipe's but for the pretrained checkpoint (built once, compared here).
SAME_MODEL_AS = {
    'mask_rcnn/mask-rcnn_r50-sn8x4-mismatched_fpn_sn-all_8xb2-2x_coco.py': FLAGSHIP,
    'mask_rcnn/mask-rcnn_r50-sn8x32-mismatched_fpn_sn-all_8xb2-2x_coco.py': FLAGSHIP,
    FLAGSHIP: 'mask_rcnn/mask-rcnn_r50_fpn_sn-all_8xb2-1x_coco.py',
    'deeplabv3/deeplabv3_r50-d8-sn8x4-mismatched_sn-all_8xb2-80k_ade20k-512x512.py':
        'deeplabv3/deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py',
    'deeplabv3/deeplabv3_r50-d8-sn8x32-mismatched_sn-all_8xb2-80k_ade20k-512x512.py':
        'deeplabv3/deeplabv3_r50-d8_sn-all_8xb2-80k_ade20k-512x512.py',
}
BUILT = [r for r in RECIPES if r not in SAME_MODEL_AS]

NORM_CLASSES = {'sn': SwitchableNorm, 'syncsn': SyncSwitchableNorm, 'sn-g2': SwitchableNorm,
                'ssn': SparseSwitchableNorm, 'bcn-ws': BatchChannelNorm, 'gn-ws': nn.GroupNorm, 'gn': nn.GroupNorm}
# Norms built from SN's layer: they train their batch statistics and validate with batch averages.
SN_FAMILY = ('sn', 'syncsn', 'sn-g2', 'ssn')
# The SSN code's training of the ratio logits (Sparse_SwitchNorm train_imagenet.py).
SSN_PARAMWISE = dict(norm_decay_mult=0., mixture_decay_mult=0., mixture_lr_mult=0.1,
                     mixture_clip_grad=dict(max_norm=1.0))
ANY_NORM = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, SwitchableNorm, BatchChannelNorm)
COMPONENTS = {
    'mask-rcnn': {'backbone': 53, 'neck': 8, 'rpn_head': 0, 'roi_head.bbox_head': 4, 'roi_head.mask_head': 4},
    'faster-rcnn': {'backbone': 53, 'neck': 8, 'rpn_head': 0, 'roi_head.bbox_head': 4},
    'deeplabv3': {'backbone': 53, 'decode_head': 5, 'auxiliary_head': 1},
    'pspnet': {'backbone': 53, 'decode_head': 4, 'auxiliary_head': 1},
}
SEG_SIZE, DET_SIZE = 32, 128
# The toolbox configs the recipes inherit (norm_eval, dataset and evaluator come from there).
UPSTREAM = {('mask-rcnn', 'coco'): 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
            ('faster-rcnn', 'coco'): 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
            ('mask-rcnn', 'cityscapes'): 'mmdet::cityscapes/mask-rcnn_r50_fpn_1x_cityscapes.py',
            ('deeplabv3', 'ade20k'): 'mmseg::_base_/models/deeplabv3_r50-d8.py',
            ('deeplabv3', 'cityscapes'): 'mmseg::_base_/models/deeplabv3_r50-d8.py',
            ('pspnet', 'ade20k'): 'mmseg::_base_/models/pspnet_r50-d8.py',
            ('pspnet', 'cityscapes'): 'mmseg::_base_/models/pspnet_r50-d8.py'}
# Training images (COCO train2017 with annotations, ADE20K and Cityscapes fine train splits) and the
# SN paper's 50k images for batch averages; 8 GPUs x 2 images per batch.
TRAIN_IMAGES = {'coco': 117_266, 'ade20k': 20_210, 'cityscapes': 2_975}
BATCH_AVERAGE_IMAGES, IMAGES_PER_BATCH = 50_000, 16
CITYSCAPES = sorted(r for r in RECIPES if r.startswith('cityscapes/'))


def recipe_kind(recipe):
    """(algorithm, norm) as the file name states them."""
    stem = Path(recipe).stem
    if recipe == FLAGSHIP:
        return 'mask-rcnn', 'sn'
    return stem.split('_')[0], re.search(r'_(sn|syncsn|sn-g2|ssn|bcn-ws|gn-ws|gn)-all_', stem).group(1)


def recipe_dataset(recipe):
    return 'coco' if recipe == FLAGSHIP else re.search(r'_(coco|cityscapes|ade20k)', recipe).group(1)


def batch_average_batches(recipe):
    """K for an SN or SyncSN recipe: 50k images, or the whole training set where it is smaller."""
    return math.ceil(min(BATCH_AVERAGE_IMAGES, TRAIN_IMAGES[recipe_dataset(recipe)]) / IMAGES_PER_BATCH)


@lru_cache(maxsize=None)
def upstream(recipe) -> Config:
    """The mmdet/mmseg config a recipe inherits, loaded through a one-line config of our own (mmengine
    resolves `mmdet::` only in `_base_`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'upstream.py'
        path.write_text(f"_base_ = '{UPSTREAM[recipe_kind(recipe)[0], recipe_dataset(recipe)]}'\n")
        return Config.fromfile(str(path))


def pretrain_images_per_gpu(recipe):
    found = re.search(r'-sn8x(\d+)-mismatched', recipe)
    return int(found.group(1)) if found else 2


@lru_cache(maxsize=None)
def load(recipe) -> Config:
    return Config.fromfile(str(CONFIG_DIR / recipe))


def submodule(model, dotted):
    for name in dotted.split('.'):
        model = getattr(model, name)
    return model


# ---------------------------------------------------------------- parsed configs (fast)

def test_recipes_found():
    assert FLAGSHIP in RECIPES and len(RECIPES) == 39
    assert {recipe_kind(r)[0] for r in RECIPES} == set(COMPONENTS)
    assert {recipe_kind(r) for r in CITYSCAPES} == {('mask-rcnn', n) for n in ('sn', 'syncsn', 'bcn-ws', 'gn-ws')}
    assert {(recipe_kind(r)[0], recipe_dataset(r)) for r in RECIPES} == set(UPSTREAM)


@pytest.mark.parametrize('recipe', RECIPES)
def test_protocol(recipe, tmp_path):
    cfg = load(recipe)
    cfg.dump(tmp_path / 'dumped.py')  # the Runner saves the config this way before training
    assert Config.fromfile(str(tmp_path / 'dumped.py')).model == cfg.model
    algo, norm = recipe_kind(recipe)
    assert cfg.custom_imports == dict(imports=['norm_plugins'], allow_failed_imports=False)
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.optim_wrapper.constructor == 'NormAwareOptimWrapperConstructor'
    assert cfg.optim_wrapper.paramwise_cfg == (SSN_PARAMWISE if norm == 'ssn' else
                                               dict(norm_decay_mult=0., mixture_decay_mult=0.))
    backbone = cfg.model.backbone
    assert backbone.type == 'ResNet' and backbone.depth == 50 and not backbone.get('deep_stem', False)
    if algo in ('mask-rcnn', 'faster-rcnn'):
        assert cfg.default_scope == 'mmdet'
        assert cfg.model.roi_head.bbox_head.type == 'Shared4Conv1FCBBoxHead'
        assert cfg.optim_wrapper.optimizer.lr == 0.02 and cfg.optim_wrapper.optimizer.weight_decay == 1e-4
        if recipe_dataset(recipe) == 'cityscapes':  # mmdet's 8 epochs over the training set repeated 8 times
            assert cfg.train_cfg.max_epochs == 8 and cfg.param_scheduler[-1].milestones == [7]
            assert cfg.model.roi_head.bbox_head.num_classes == cfg.model.roi_head.mask_head.num_classes == 8
            assert cfg.load_from is None  # not mmdet's COCO-trained BN model
        else:
            two_x = recipe == FLAGSHIP or '-2x_' in recipe
            assert cfg.train_cfg.max_epochs == (24 if two_x else 12)
            assert cfg.param_scheduler[-1].milestones == ([16, 22] if two_x else [8, 11])
    else:
        assert cfg.default_scope == 'mmseg'
        assert cfg.model.pretrained is None
        assert backbone.strides == (1, 2, 1, 1) and backbone.dilations == (1, 1, 2, 4)
        assert cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
        assert [(s.type, s.power) for s in cfg.param_scheduler] == [('PolyLR', 0.9)]
        head_type = {'deeplabv3': 'PoolNormASPPHead', 'pspnet': 'PoolNormPSPHead'}[algo]
        assert cfg.model.decode_head.type == head_type
        assert cfg.model.decode_head.pool_norm_cfg.type == 'SyncBN'
        num_classes = 150 if 'ade20k' in recipe else 19
        assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == num_classes
    hooks = [h.type for h in cfg.get('custom_hooks', [])]
    assert ('BCNUpdateRateHook' in hooks) == (norm == 'bcn-ws')
    assert ('SSNRadiusHook' in hooks) == (norm == 'ssn')
    if norm in ('sn-g2', 'ssn'):  # variants of the flagship (2x, checked above) and of DeepLabV3 ADE20K
        assert (algo, recipe_dataset(recipe)) in {('mask-rcnn', 'coco'), ('deeplabv3', 'ade20k')}
    assert (backbone.norm_cfg.get('ratio_groups', 1) == 2) == (norm == 'sn-g2')
    if norm == 'bcn-ws':
        assert {k: backbone.norm_cfg[k] for k in ('type', 'num_groups', 'estimate')} == dict(
            type='BCN', num_groups=32, estimate=True)


@pytest.mark.parametrize('recipe', RECIPES)
def test_norm_eval(recipe):
    """False where SN (SyncSN, group SN, SSN) or BCN train (mmdet's True would only freeze _BatchNorm,
    but reads as if they were frozen); GN baselines keep the toolbox's value."""
    _, norm = recipe_kind(recipe)
    expected = False if norm in SN_FAMILY + ('bcn-ws',) else upstream(recipe).model.backbone.norm_eval
    assert load(recipe).model.backbone.norm_eval is expected
    if recipe_kind(recipe)[0] in ('mask-rcnn', 'faster-rcnn'):
        assert upstream(recipe).model.backbone.norm_eval is True  # so False is written, not inherited


@pytest.mark.parametrize('recipe', RECIPES)
def test_batch_average_evaluation(recipe):
    """SN-family recipes run PreciseStatsHook with K batches (and no other custom hook, so that
    `--cfg-options custom_hooks=[]` turns exactly it off; SSN's radius hook follows it); no other
    recipe runs it."""
    hooks = load(recipe).get('custom_hooks', [])
    norm = recipe_kind(recipe)[1]
    if norm in SN_FAMILY:
        assert hooks == [dict(type='PreciseStatsHook', num_batches=batch_average_batches(recipe))] + (
            [dict(type='SSNRadiusHook')] if norm == 'ssn' else [])
    else:
        assert 'PreciseStatsHook' not in [h.type for h in hooks]


def test_batch_average_batches_per_dataset():
    assert {d: batch_average_batches(f'x_sn-all_8xb2-1x_{d}.py') for d in TRAIN_IMAGES} == dict(
        coco=3125, ade20k=1264, cityscapes=186)


@pytest.mark.parametrize('options, expected', [([], [3125]), (['custom_hooks=[]'], []),
                                               (['custom_hooks.0.num_batches=200'], [200])])
def test_batch_average_switch_under_a_runner(tmp_path, options, expected):
    """The documented command-line switches, parsed as tools/train.py parses them, reach the Runner's
    hooks; the hook runs ahead of CheckpointHook (it recomputes before the checkpoint is saved)."""
    from mmengine.runner import Runner
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg_options = parser.parse_args(['--cfg-options', *options]).cfg_options if options else None
    cfg = load_config(str(CONFIG_DIR / FLAGSHIP), cfg_options)
    cfg.work_dir = str(tmp_path)
    cfg.model.backbone.init_cfg = None
    runner = Runner.from_cfg(cfg)
    names = [type(h).__name__ for h in runner.hooks]
    assert [h.num_batches for h in runner.hooks if type(h).__name__ == 'PreciseStatsHook'] == expected
    if expected:
        assert names.index('PreciseStatsHook') < names.index('CheckpointHook')


@pytest.mark.parametrize('recipe', CITYSCAPES)
def test_cityscapes_data_and_evaluation_are_mmdets(recipe):
    """Everything but the model, the batch per GPU, the lr and load_from is mmdet's Cityscapes config."""
    cfg, base = load(recipe), upstream(recipe)
    assert cfg.train_dataloader.batch_size == 2 and base.train_dataloader.batch_size == 1
    assert cfg.optim_wrapper.optimizer.lr == 2 * base.optim_wrapper.optimizer.lr  # linear scaling
    assert {k: v for k, v in cfg.train_dataloader.items() if k != 'batch_size'} == {
        k: v for k, v in base.train_dataloader.items() if k != 'batch_size'}
    for key in ('val_dataloader', 'test_dataloader', 'val_evaluator', 'test_evaluator', 'train_cfg',
                'val_cfg', 'test_cfg', 'param_scheduler', 'default_hooks'):
        assert cfg[key] == base[key], key
    assert [m.type for m in cfg.val_evaluator] == ['CocoMetric', 'CityScapesMetric']
    assert cfg.train_dataloader.dataset.dataset.type == 'CityscapesDataset'
    model, base_model = cfg.model, base.model
    assert model.data_preprocessor == base_model.data_preprocessor
    assert model.train_cfg == base_model.train_cfg and model.test_cfg == base_model.test_cfg
    assert model.roi_head.bbox_head.loss_bbox == base_model.roi_head.bbox_head.loss_bbox


@pytest.mark.parametrize('recipe', RECIPES)
def test_pretrained_backbone(recipe):
    """The backbone is the manifest entry pretrained at the finetuning images per GPU (except the
    mismatched ablation, which the batch check warns about), and it fits the entry's weights."""
    cfg = load(recipe)
    _, norm = recipe_kind(recipe)
    checkpoint = cfg.model.backbone.init_cfg.checkpoint
    expected = {'sn': f'norm_plugins://resnet50_sn_8x{pretrain_images_per_gpu(recipe)}',
                'syncsn': 'norm_plugins://resnet50_sn_8x2', 'sn-g2': 'norm_plugins://resnet50_sn_8x2_g2',
                'ssn': 'norm_plugins://resnet50_ssn_8x2', 'bcn-ws': 'norm_plugins://resnet50_bcn_ws',
                'gn-ws': 'open-mmlab://jhu/resnet50_gn_ws', 'gn': 'open-mmlab://detectron/resnet50_gn'}[norm]
    assert checkpoint == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        comparisons = check_pretrained_config(cfg)
    assert [c.name for c in comparisons] == [r.name for r in pretrained_references(cfg.model)]
    for ref in pretrained_references(cfg.model):  # check_pretrained_config checked the layers fit
        entry_formula = (get_entry(ref.name).conv_cfg or {}).get('formula')
        assert entry_formula == (cfg.model.backbone.get('conv_cfg') or {}).get('formula')
    mismatched = [w for w in caught if issubclass(w.category, PretrainingBatchMismatchWarning)]
    assert bool(mismatched) == ('mismatched' in recipe)


@pytest.mark.parametrize('recipe, same_as', sorted(SAME_MODEL_AS.items()))
def test_recipes_sharing_a_model(recipe, same_as):
    def without_checkpoint(cfg):
        model = cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else dict(cfg.model)
        model['backbone'] = {k: v for k, v in model['backbone'].items() if k != 'init_cfg'}
        return model
    assert without_checkpoint(load(recipe)) == without_checkpoint(load(same_as))


def test_metafiles_list_every_recipe_with_paper_numbers():
    listed = Counter()
    for metafile in sorted(CONFIG_DIR.glob('*/metafile.yml')):
        data = yaml.safe_load(metafile.read_text())
        collections = {c['Name'] for c in data['Collections']}
        for model in data['Models']:
            assert model['In Collection'] in collections
            config = Path(model['Config'])
            assert config.parts[0] == 'configs' and (CONFIG_DIR.parent / config).is_file(), model['Config']
            assert model['Name'] == config.stem
            recipe = config.relative_to('configs').as_posix()
            listed[recipe] += 1
            assert model['Results'] == [] and model['Weights'] is None  # nothing measured here
            assert model['Metadata']['Batch Size'] == 16 and model['Metadata']['Images Per GPU'] == 2
            assert model['Metadata']['Pretrained'] == load(recipe).model.backbone.init_cfg.checkpoint
            for result in model['Paper Results']:
                assert result['Source'] and result['Metrics'] and result['Dataset']
                assert all(isinstance(v, float) for v in result['Metrics'].values())
    assert listed == Counter(RECIPES)


def test_flagship_backbone_loads_by_manifest_name(tmp_path, monkeypatch):
    """Missing file: the manifest's message. A (synthetic) converted file in $NORM_PLUGINS_HOME: the
    backbone's init_weights loads exactly it through the norm_plugins:// scheme."""
    monkeypatch.setenv('NORM_PLUGINS_HOME', str(tmp_path))
    cfg = load(FLAGSHIP)
    init_default_scope(cfg.default_scope)
    backbone = MODELS.build(cfg.model.backbone)
    with pytest.raises(PretrainedFileMissingError) as info:
        backbone.init_weights()
    entry = get_entry('resnet50_sn_8x2')
    assert 'norm_plugins://resnet50_sn_8x2' in str(info.value)
    assert all(url in str(info.value) for url in entry.source_urls)

    source = MODELS.build(dict(cfg.model.backbone, init_cfg=None))
    generator = torch.Generator().manual_seed(1)
    synthetic = {k: torch.rand(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
                 for k, v in source.state_dict().items()}
    (tmp_path / 'checkpoints').mkdir()
    staging = tmp_path / 'checkpoints' / 'staging'
    torch.save(synthetic, staging)
    staging.rename(tmp_path / 'checkpoints' / converted_file_name(entry.name, file_sha256(staging)))
    backbone.init_weights()
    loaded = backbone.state_dict()
    assert loaded.keys() == synthetic.keys()
    for key, value in synthetic.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- built models

@pytest.fixture(scope='module', params=BUILT)
def built(request):
    """(recipe, cfg, model): the recipe's model on CPU with PyTorch's default initialization
    (test_flagship_backbone_loads_by_manifest_name covers init_weights; here it would only cost time)."""
    recipe = request.param
    cfg = load(recipe)
    init_default_scope(cfg.default_scope)
    model_cfg = copy.deepcopy(cfg.model)  # load() is cached: leave its config untouched
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)
    if 'size' in model_cfg.data_preprocessor:  # mmseg pads every training batch to the crop size
        model_cfg.data_preprocessor = dict(model_cfg.data_preprocessor, size=(SEG_SIZE, SEG_SIZE))
    if 'roi_head' in model_cfg:  # fewer RoIs: the 4conv1fc and mask heads cost per RoI on CPU
        model_cfg.train_cfg.rpn_proposal.max_per_img = 64
        model_cfg.train_cfg.rcnn.sampler.num = 32
        model_cfg.test_cfg.rpn.max_per_img = 32
        model_cfg.test_cfg.rcnn.max_per_img = 8
    torch.manual_seed(0)
    return recipe, cfg, MODELS.build(model_cfg)


def norms_in(module):
    return [m for m in module.modules() if isinstance(m, ANY_NORM)]


def test_normalizers_where_the_name_says(built):
    recipe, _, model = built
    algo, norm = recipe_kind(recipe)
    norm_class = NORM_CLASSES[norm]
    for component, count in COMPONENTS[algo].items():
        module = submodule(model, component)
        # mmcv's SyncBN is mmengine's subclass of nn.SyncBatchNorm
        found = Counter(nn.SyncBatchNorm if isinstance(m, nn.SyncBatchNorm) else type(m)
                        for m in norms_in(module))
        pool = 1 if component == 'decode_head' else 0  # the global-pooling branch: see test below
        expected = Counter({norm_class: count, nn.SyncBatchNorm: pool})
        assert found == +expected, component
        ws_convs = sum(isinstance(m, WSConv2d) for m in module.modules())
        assert ws_convs == (count + pool if norm.endswith('-ws') else 0), component
    assert len(norms_in(model)) == sum(COMPONENTS[algo].values()) + (algo in ('deeplabv3', 'pspnet'))
    for layer in norms_in(model):
        if isinstance(layer, SwitchableNorm):
            assert layer.normalizers == ('in', 'ln', 'bn') and layer.unbiased_instance_var
            assert layer.ratio_groups == (2 if norm == 'sn-g2' else 1) and layer.momentum == 0.003
        if isinstance(layer, BatchChannelNorm):
            assert layer.estimate and layer.num_groups == 32


def test_no_sn_after_global_pooling(built):
    recipe, _, model = built
    pools = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    if recipe_kind(recipe)[0] in ('deeplabv3', 'pspnet'):
        assert len(pools) == 1
    for name, pool in pools:
        parent = submodule(model, name.rsplit('.', 1)[0])
        following = list(parent)[list(parent).index(pool) + 1]
        assert isinstance(following.norm, nn.SyncBatchNorm), name


def test_optimizer_decays_convs_not_norms(built):
    recipe, cfg, model = built
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper.to_dict())
    base_lr, base_wd = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(group_of) == trainable
    # SSN's ratio logits at a tenth of the learning rate (the SSN code); every other norm parameter at it.
    logits_lr = base_lr * cfg.optim_wrapper.paramwise_cfg.get('mixture_lr_mult', 1.0)
    norm_params = 0
    for layer in norms_in(model):
        for name, param in layer.named_parameters(recurse=False):
            if param.requires_grad:
                assert group_of[id(param)]['weight_decay'] == 0, name
                is_logit = name in ('mean_weight', 'var_weight')
                assert group_of[id(param)]['lr'] == pytest.approx(logits_lr if is_logit else base_lr), name
                norm_params += 1
    assert norm_params > 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.requires_grad:
            assert group_of[id(module.weight)]['weight_decay'] == base_wd


def det_batch(model, with_mask):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, DET_SIZE, DET_SIZE)] * 2, num_items=[3, 2],
                          num_classes=model.roi_head.bbox_head.num_classes, with_mask=with_mask)


def seg_batch(model):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, SEG_SIZE, SEG_SIZE), generator=generator, dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(SEG_SIZE, SEG_SIZE), ori_shape=(SEG_SIZE, SEG_SIZE),
                                             pad_shape=(SEG_SIZE, SEG_SIZE)))
        labels = torch.randint(0, model.decode_head.num_classes, (1, SEG_SIZE, SEG_SIZE), generator=generator)
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.slow
def test_train_step_and_predict(built):
    """One loss forward/backward with finite gradients for every trainable parameter, SN never fed a
    single-pixel map, then one predict."""
    recipe, _, model = built
    algo, _ = recipe_kind(recipe)
    detection = algo in ('mask-rcnn', 'faster-rcnn')
    packed = det_batch(model, algo == 'mask-rcnn') if detection else seg_batch(model)
    spatial = []
    hooks = [m.register_forward_pre_hook(lambda _, args: spatial.append(args[0][0, 0].numel()))
             for m in model.modules() if isinstance(m, SwitchableNorm)]
    model.train()
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert not spatial or min(spatial) > 1
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode='predict')
    assert len(results) == 2
    for result in results:
        if detection:
            assert torch.isfinite(result.pred_instances.bboxes).all()
            if algo == 'mask-rcnn':
                assert result.pred_instances.masks.shape[1:] == (DET_SIZE, DET_SIZE)
        else:
            assert result.pred_sem_seg.data.shape == (1, SEG_SIZE, SEG_SIZE)
            assert torch.isfinite(result.seg_logits.data).all()
