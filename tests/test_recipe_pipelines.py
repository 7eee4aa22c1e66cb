"""Every recipe under configs/ (configs/demo/ has its own end-to-end tests) through its real data
pipeline, on tiny datasets in the real on-disk layouts (recipe_datasets.py).

One recipe per model x dataset runs as a user runs it: tools/train.py for two iterations (or one epoch
of two iterations), one validation with the recipe's own evaluators, then tools/test.py on the saved
checkpoint, whose metrics must equal that validation's. Every other recipe builds its train and val
dataloaders, model and evaluators from the config in this process, and one training batch goes
through the data preprocessor and the loss and one validation batch through the evaluators.

The overrides (``recipe_options``) only point the datasets and evaluators at the tiny data, shorten
the schedule (2 iterations, or 1 epoch with the dataset repeated once; PreciseStatsHook over 2
batches), scale the resize, crop and sliding-window sizes down by a factor per dataset, switch the
pretrained backbone off (``init_cfg=None``) and log every iteration. Every transform, dataset class,
evaluator and model piece stays as the recipe has it. Detection recipes also load a one-tensor
checkpoint (``load_from``) that biases the box classifier towards one class: an untrained classifier
scores every class about 1 / (classes + 1), below the 0.05 test threshold, and the COCO and Cityscapes
metrics of an empty result are missing instead of zero.
"""
import json
import math
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import Evaluator
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import Runner

import norm_plugins  # noqa: F401
from recipe_datasets import make_ade20k, make_cityscapes, make_coco
from tools_helpers import REPO, run_tool, tool_env

pytestmark = pytest.mark.slow

CONFIG_DIR = REPO / 'configs'
RECIPES = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob('*.py')
                 if '_base_' not in p.parts and p.relative_to(CONFIG_DIR).parts[0] != 'demo')
# One recipe per model x dataset through train.py and test.py, with every normalizer family among them.
TRAIN_TEST = {
    'mask-rcnn-coco': 'mask_rcnn_sn.py',
    'faster-rcnn-coco': 'faster_rcnn/faster-rcnn_r50_fpn_bcn-ws-all_8xb2-1x_coco.py',
    'mask-rcnn-cityscapes': 'cityscapes/mask-rcnn_r50_fpn_syncsn-all_8xb2-1x_cityscapes.py',
    'deeplabv3-cityscapes': 'deeplabv3/deeplabv3_r50-d8_sn-all_8xb2-80k_cityscapes-769x769.py',
    'deeplabv3-ade20k': 'deeplabv3/deeplabv3_r50-d8_gn-ws-all_8xb2-80k_ade20k-512x512.py',
    'pspnet-cityscapes': 'pspnet/pspnet_r50-d8_bcn-ws-all_8xb2-80k_cityscapes-769x769.py',
    'pspnet-ade20k': 'pspnet/pspnet_r50-d8_syncsn-all_8xb2-80k_ade20k-512x512.py',
}
BUILT_ONLY = [r for r in RECIPES if r not in TRAIN_TEST.values()]
# Sizes divided by: COCO (1333, 800) -> (133, 80); Cityscapes (2048, 1024) -> (128, 64), crop 769 -> 48;
# ADE20K (2048, 512) -> (256, 64), crop 512 -> 64.
SCALE_DOWN = {'coco': 10, 'cityscapes': 16, 'ade20k': 8}
DATASET_KINDS = {'CocoDataset': 'coco', 'CityscapesDataset': 'cityscapes', 'ADE20KDataset': 'ade20k'}
PHASES = ('train', 'val', 'test')
TRAIN_ITERS, PRECISE_BATCHES = 2, 2
# Logit of the favoured class in the load_from checkpoint: softmax ~0.65 against 80 classes at 0.
FAVOURED_LOGIT = 5.0


@pytest.fixture(scope='session')
def data_roots(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp('recipe_data')
    return {'coco': make_coco(root / 'coco'), 'cityscapes': make_cityscapes(root / 'cityscapes'),
            'ade20k': make_ade20k(root / 'ade')}


def _datasets(cfg) -> Iterator[Tuple[str, dict]]:
    """(option key, dataset config) of each phase's dataset, inside dataset wrappers."""
    for phase in PHASES:
        key, dataset = f'{phase}_dataloader.dataset', cfg[f'{phase}_dataloader']['dataset']
        while 'dataset' in dataset:
            key, dataset = f'{key}.dataset', dataset['dataset']
        yield key, dataset


def dataset_kind(cfg) -> str:
    return DATASET_KINDS[next(_datasets(cfg))[1]['type']]


def _scaled(value, factor: int):
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, factor) for v in value)
    return max(1, round(value / factor))


def _as_option(value) -> str:
    """``value`` as mmengine's DictAction reads it back (no spaces: one shell word)."""
    if isinstance(value, tuple):
        return '(' + ','.join(_as_option(v) for v in value) + ('' if len(value) > 1 else ',') + ')'
    if isinstance(value, list):
        return '[' + ','.join(_as_option(v) for v in value) + ']'
    return str(value)


def recipe_options(cfg, data_roots: Dict[str, Path], load_from: Path = None) -> Dict[str, object]:
    """The overrides of the module docstring for the loaded recipe ``cfg``, as {key: value}."""
    kind = dataset_kind(cfg)
    factor = SCALE_DOWN[kind]
    new_root = str(data_roots[kind]) + '/'
    options: Dict[str, object] = {}
    old_roots = []
    for key, dataset in _datasets(cfg):
        old_roots.append(dataset['data_root'].rstrip('/') + '/')
        options[f'{key}.data_root'] = new_root
        for index, transform in enumerate(dataset['pipeline']):
            for field in ('scale', 'crop_size'):
                if isinstance(transform.get(field), (list, tuple)):
                    options[f'{key}.pipeline.{index}.{field}'] = _scaled(transform[field], factor)
    for phase in ('val', 'test'):
        evaluators = cfg[f'{phase}_evaluator']
        indexed = enumerate(evaluators) if isinstance(evaluators, (list, tuple)) else [(None, evaluators)]
        for index, evaluator in indexed:
            prefix = f'{phase}_evaluator' + ('' if index is None else f'.{index}')
            for field in ('ann_file', 'seg_prefix'):
                if isinstance(evaluator.get(field), str):
                    old = next(r for r in old_roots if evaluator[field].startswith(r))
                    options[f'{prefix}.{field}'] = new_root + evaluator[field][len(old):]
    model = cfg['model']
    if model.get('data_preprocessor', {}).get('size'):
        options['model.data_preprocessor.size'] = _scaled(model['data_preprocessor']['size'], factor)
    for field in ('crop_size', 'stride'):
        if model.get('test_cfg', {}).get(field):
            options[f'model.test_cfg.{field}'] = _scaled(model['test_cfg'][field], factor)
    if 'max_iters' in cfg['train_cfg']:
        options['train_cfg.max_iters'] = TRAIN_ITERS
    else:
        options['train_cfg.max_epochs'] = 1
        if cfg['train_dataloader']['dataset']['type'] == 'RepeatDataset':
            options['train_dataloader.dataset.times'] = 1
    for index, hook in enumerate(cfg.get('custom_hooks', [])):
        if hook['type'] == 'PreciseStatsHook':
            options[f'custom_hooks.{index}.num_batches'] = PRECISE_BATCHES
    options['model.backbone.init_cfg'] = None
    options['default_hooks.logger.interval'] = 1
    if load_from is not None:
        options['load_from'] = str(load_from)
    return options


def load_recipe(recipe: str) -> Config:
    return Config.fromfile(str(CONFIG_DIR / recipe))


def is_detector(cfg) -> bool:
    return 'roi_head' in cfg['model']


def favour_first_class(bias: torch.Tensor) -> torch.Tensor:
    """The box classifier's bias with class 0 at ``FAVOURED_LOGIT`` (background and the rest at 0)."""
    favoured = torch.zeros_like(bias)
    favoured[0] = FAVOURED_LOGIT
    return favoured


def classifier_checkpoint(cfg, folder: Path) -> Path:
    """A checkpoint holding only the box classifier's favouring bias, for ``load_from``."""
    path = folder / 'favoured_class.pth'
    bias = favour_first_class(torch.zeros(cfg['model']['roi_head']['bbox_head']['num_classes'] + 1))
    torch.save({'state_dict': {'roi_head.bbox_head.fc_cls.bias': bias}}, path)
    return path


def expected_metrics(cfg) -> Dict[str, Tuple[float, float]]:
    """{metric key: (low, high)} the recipe's val evaluators report on any data with ground truth."""
    evaluators = cfg['val_evaluator']
    expected = {}
    for evaluator in evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]:
        kind = evaluator['type']
        if kind == 'CocoMetric':
            metrics = evaluator['metric']
            for metric in [metrics] if isinstance(metrics, str) else metrics:
                # Area ranges without ground truth (COCOeval's -1) are possible on tiny data; the overall
                # numbers are not.
                expected.update({f'coco/{metric}_mAP': (0.0, 1.0), f'coco/{metric}_mAP_50': (0.0, 1.0),
                                 f'coco/{metric}_mAP_75': (0.0, 1.0)})
                expected.update({f'coco/{metric}_mAP_{area}': (-1.0, 1.0) for area in 'sml'})
        elif kind == 'CityScapesMetric':
            expected.update({'cityscapes/mAP': (0.0, 1.0), 'cityscapes/AP@50': (0.0, 1.0)})
        elif kind == 'IoUMetric':
            expected.update({'aAcc': (0.0, 100.0)})
            expected.update({metric: (0.0, 100.0) for metric in evaluator['iou_metrics']})
            expected['mAcc'] = (0.0, 100.0)
        else:
            raise AssertionError(f'no expectation written for evaluator {kind}; add one here')
    return expected


def check_metrics(metrics: Dict[str, float], expected: Dict[str, Tuple[float, float]], where: str) -> None:
    missing = sorted(set(expected) - set(metrics))
    assert not missing, f'{where}: metrics {missing} missing from {sorted(metrics)}'
    for key, (low, high) in expected.items():
        assert low <= metrics[key] <= high, f'{where}: {key}={metrics[key]} outside [{low}, {high}]'


def _scalars(work_dir: Path) -> List[dict]:
    """The records of the run's vis_data/scalars.json (one per logged training step or validation)."""
    (path,) = work_dir.glob('*/vis_data/scalars.json')
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _options_args(options: Dict[str, object]) -> List[str]:
    return ['--cfg-options'] + [f'{key}={_as_option(value)}' for key, value in options.items()]


@pytest.mark.parametrize('recipe', list(TRAIN_TEST.values()), ids=list(TRAIN_TEST))
def test_train_validate_and_test(recipe, data_roots, tmp_path):
    cfg = load_recipe(recipe)
    options = recipe_options(cfg, data_roots, classifier_checkpoint(cfg, tmp_path) if is_detector(cfg) else None)
    work_dir, config = tmp_path / 'train', str(CONFIG_DIR / recipe)
    # The flagship trains and tests through the fused CPU loops, as a user's run does.
    env = tool_env(cpu_fusion=recipe == TRAIN_TEST['mask-rcnn-coco'])
    # cwd: the Cityscapes metric writes its files under ./work_dirs.
    trained = run_tool([str(REPO / 'tools' / 'train.py'), config, '--work-dir', str(work_dir)]
                       + _options_args(options), cwd=tmp_path, env=env)

    records = _scalars(work_dir)
    expected = expected_metrics(cfg)
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == TRAIN_ITERS and all(math.isfinite(v) for v in losses), records
    validations = [r for r in records if set(expected) & set(r)]
    assert len(validations) == 1, records
    check_metrics(validations[0], expected, f'{recipe} validation')

    output = trained.stdout + trained.stderr
    if any(hook['type'] == 'PreciseStatsHook' for hook in cfg.get('custom_hooks', [])):
        # Batch averages are computed before the checkpoint of the validated epoch/iteration is written.
        recomputed = output.find(f'over {PRECISE_BATCHES} training batches')
        assert -1 < recomputed < output.find('Saving checkpoint'), output[-3000:]

    checkpoint = Path((work_dir / 'last_checkpoint').read_text().strip())
    summary = tmp_path / 'test_metrics.json'
    run_tool([str(REPO / 'tools' / 'test.py'), config, str(checkpoint), '--work-dir', str(tmp_path / 'test'),
              '--metrics-json', str(summary)] + _options_args(options), cwd=tmp_path, env=env)
    tested = json.loads(summary.read_text())['metrics']
    check_metrics(tested, expected, f'{recipe} test.py')
    # The checkpoint holds the statistics the validation ran with (batch averages where the recipe
    # recomputes them), so evaluating it again gives the same numbers.
    assert {k: tested[k] for k in expected} == pytest.approx({k: validations[0][k] for k in expected}, abs=1e-9)


@pytest.mark.parametrize('recipe', BUILT_ONLY)
def test_pipeline_loss_and_evaluators(recipe, data_roots, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Cityscapes metric writes under ./work_dirs
    cfg = load_recipe(recipe)
    cfg.merge_from_dict(recipe_options(cfg, data_roots))
    init_default_scope(cfg.default_scope)
    loaders = {phase: Runner.build_dataloader(dict(cfg[f'{phase}_dataloader'], num_workers=0,
                                                   persistent_workers=False), seed=0)
               for phase in ('train', 'val')}
    model = MODELS.build(cfg.model)
    if is_detector(cfg):
        with torch.no_grad():
            model.roi_head.bbox_head.fc_cls.bias.copy_(favour_first_class(model.roi_head.bbox_head.fc_cls.bias))

    model.train()
    batch = next(iter(loaders['train']))
    assert len(batch['inputs']) == cfg.train_dataloader.batch_size
    losses = model(**model.data_preprocessor(batch, True), mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total), losses

    model.eval()
    evaluator = Evaluator(cfg.val_evaluator)
    evaluator.dataset_meta = loaders['val'].dataset.metainfo
    with torch.no_grad():
        for batch in loaders['val']:
            evaluator.process(model.val_step(batch), batch)
    metrics = evaluator.evaluate(len(loaders['val'].dataset))
    check_metrics(metrics, expected_metrics(cfg), recipe)
