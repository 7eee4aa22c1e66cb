"""Fast tests of what tools/train.py and tools/test.py rely on: safe checkpoint loading, the
layer summary, the shapes generator, CPU launch coordinates and the one-line input errors."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from PIL import Image
from torch import nn

import norm_plugins  # noqa: F401  (registers the layers)
from norm_plugins.demo.shapes import CLASSES, generate_shapes_dataset, shapes_dataset_ready
from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d
from norm_plugins.runner import ToolError, count_layers, describe_layers, mmengine_checkpoint_globals
from norm_plugins.runner.cpu_distributed import process_coordinates, replace_gpu_only_sync_bn
from norm_plugins.runner import entrypoints
from tools_helpers import DEEPLAB, DEMO, FASTER_RCNN, MASK_RCNN, PSPNET, REPO, make_tiny_shapes, tiny_options


# ---------------------------------------------------------------- weights_only checkpoint loading

def _runner_like_checkpoint(path):
    hub = MessageHub.get_instance('test_tools_support')
    for value in (1.0, np.float64(3.0)):
        hub.update_scalar('train/loss', value)
    hub.update_info('iter', 7)
    torch.save({'meta': {'iter': 7, 'seed': 0, 'dataset_meta': {'classes': CLASSES}},
                'state_dict': {'w': torch.arange(3.0)}, 'message_hub': hub.state_dict()}, path)


def test_mmengine_checkpoint_needs_the_allowlist_and_loads_within_it(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pth'
    _runner_like_checkpoint(path)
    # As in a fresh process, where no HistoryBuffer has registered the default statistics yet.
    monkeypatch.setattr(HistoryBuffer, '_statistics_methods', {})
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # torch's default: weights_only=True
    with mmengine_checkpoint_globals():
        checkpoint = torch.load(path)
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    assert buffer.mean() == 2.0 and buffer.statistics('max') == 3.0
    assert torch.equal(checkpoint['state_dict']['w'], torch.arange(3.0))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # the allowlist ends with the block


class _GetattrPayload:
    """Pickles as getattr(HistoryBuffer, 'update'): a method that is not a statistics method."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, 'update')


class _ForeignClassPayload:
    def __reduce__(self):
        return subprocess.Popen, (['true'],)


@pytest.mark.parametrize('payload', [_GetattrPayload(), _ForeignClassPayload()], ids=['getattr', 'foreign-class'])
def test_allowlist_refuses_everything_else(tmp_path, payload):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': payload}, path)
    with mmengine_checkpoint_globals(), pytest.raises(pickle.UnpicklingError):
        torch.load(path)


# ---------------------------------------------------------------- layer summary

def test_layer_counts_by_exact_registered_type():
    model = nn.Sequential(SwitchableNorm(4), SwitchableNorm(4), SyncSwitchableNorm(4), WSConv2d(4, 8, 3),
                          BatchChannelNorm(8, num_groups=2), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.ReLU())
    counts = count_layers(model)
    assert counts['plugin'] == {'SN': 2, 'SyncSN': 1, 'WSConv': 1, 'BCN': 1}
    assert counts['other_norm'] == {'BatchNorm2d': 1, 'GroupNorm': 1}
    line = describe_layers(model)
    assert line.startswith('norm_plugins layers in the model: BCN x1, SN x2, SyncSN x1, WSConv x1;')
    assert line.endswith('other normalization layers: BatchNorm2d x1, GroupNorm x1')
    assert describe_layers(nn.Linear(2, 2)) == ('norm_plugins layers in the model: none; '
                                                'other normalization layers: none')


# ---------------------------------------------------------------- shapes dataset

def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_shapes_dataset_is_deterministic_and_consistent(tmp_path):
    first = make_tiny_shapes(tmp_path / 'a')
    second = make_tiny_shapes(tmp_path / 'b')
    assert _files(first) == _files(second)
    other = generate_shapes_dataset(str(tmp_path / 'c'), num_train=16, num_val=4, image_size=96, seed=4)
    assert _files(first) != _files(tmp_path / 'c') and other == str(tmp_path / 'c')
    assert shapes_dataset_ready(str(first), num_train=16, num_val=4, image_size=96, seed=3)
    assert not shapes_dataset_ready(str(first), num_train=16, num_val=4, image_size=96, seed=0)

    for split, count in (('train', 16), ('val', 4)):
        coco = json.loads((first / 'annotations' / f'instances_{split}.json').read_text())
        assert [c['name'] for c in coco['categories']] == list(CLASSES)
        assert len(coco['images']) == count
        for image in coco['images']:
            anns = [a for a in coco['annotations'] if a['image_id'] == image['id']]
            assert 1 <= len(anns) <= 4
            label = np.array(Image.open(first / 'ann_dir' / split / image['file_name']))
            rgb = np.array(Image.open(first / 'img_dir' / split / image['file_name']))
            assert label.shape == (96, 96) and rgb.shape == (96, 96, 3)
            for class_id in range(1, len(CLASSES) + 1):
                # Rasterized class area matches the polygons' area (edge pixels differ slightly).
                area = sum(a['area'] for a in anns if a['category_id'] == class_id)
                pixels = int((label == class_id).sum())
                assert abs(pixels - area) <= 0.1 * area + 40, (split, image['file_name'], class_id)
            for ann in anns:
                x, y, w, h = ann['bbox']
                box = label[int(y) + 1:int(y + h), int(x) + 1:int(x + w)]
                assert (box == ann['category_id']).mean() > 0.3


def test_shapes_generator_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match='image_size'):
        generate_shapes_dataset(str(tmp_path), image_size=16)
    with pytest.raises(ValueError, match='num_train'):
        generate_shapes_dataset(str(tmp_path), num_train=0)


# ---------------------------------------------------------------- demo configs

@pytest.mark.parametrize('config, expected', [
    (MASK_RCNN, {'SN'}), (FASTER_RCNN, {'SyncSN'}), (DEEPLAB, {'SN'}), (PSPNET, {'BCN', 'WSConv'})],
    ids=lambda v: getattr(v, 'stem', None))
def test_demo_configs_build_with_their_plugin_layers(config, expected):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, MODELS
    cfg = Config.fromfile(str(config))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    plugins = count_layers(model)['plugin']
    assert set(plugins) == expected
    # Everything in the backbone is the plug-in norm; only a pooled branch may keep BN.
    assert not count_layers(model.backbone)['other_norm']
    assert all(v > 5 for v in plugins.values())


# ---------------------------------------------------------------- one-line errors

def _tool_error(tool, argv):
    with pytest.raises(ToolError) as info:
        tool(argv)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_missing_config():
    message = _tool_error(entrypoints.train, ['configs/demo/nope.py'])
    assert message.startswith('config file not found: configs/demo/nope.py') and 'configs/demo/' in message


def test_missing_shapes_dataset_says_how_to_generate_it(tmp_path):
    root = tmp_path / 'shapes'
    message = _tool_error(entrypoints.train, [str(MASK_RCNN), '--work-dir', str(tmp_path / 'w'),
                                       '--cfg-options'] + tiny_options(MASK_RCNN, root))
    assert message.startswith(f'dataset not found: {root}/')
    assert f'python tools/make_shapes_dataset.py --out {root}' in message


def test_missing_other_dataset_names_the_paths_and_the_option(tmp_path):
    root = tmp_path / 'coco'
    message = _tool_error(entrypoints.train, [str(MASK_RCNN), '--work-dir', str(tmp_path / 'w'),
                                       '--cfg-options'] + tiny_options(MASK_RCNN, root))
    assert f'{root}/annotations/instances_train.json' in message
    assert '--cfg-options train_dataloader.dataset.data_root=' in message


def test_missing_checkpoints(tmp_path):
    root = make_tiny_shapes(tmp_path / 'shapes')
    base = [str(DEEPLAB), '--work-dir', str(tmp_path / 'w')]
    options = ['--cfg-options'] + tiny_options(DEEPLAB, root)
    message = _tool_error(entrypoints.train, base + ['--resume', str(tmp_path / 'gone.pth')] + options)
    assert message.startswith(f'checkpoint not found: {tmp_path}/gone.pth (--resume)')
    assert '--resume alone' in message
    message = _tool_error(entrypoints.train, base + options + [f'load_from={tmp_path}/old.pth'])
    assert message.startswith(f'checkpoint not found: {tmp_path}/old.pth (load_from in the config)')
    message = _tool_error(entrypoints.test, [str(DEEPLAB), str(tmp_path / 'x.pth'), '--work-dir', str(tmp_path / 'w')]
                          + options)
    assert message.startswith(f'checkpoint not found: {tmp_path}/x.pth') and 'tools/train.py' in message


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp is allowed with a GPU')
def test_amp_without_gpu(tmp_path):
    message = _tool_error(entrypoints.train, [str(DEEPLAB), '--amp', '--work-dir', str(tmp_path)])
    assert '--amp needs a CUDA GPU' in message


def test_launch_coordinates_and_missing_launcher_environment():
    env = {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'n0', 'MASTER_PORT': '1234'}
    assert process_coordinates('pytorch', env) == (3, 4, 1, 'n0', '1234')
    slurm = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '1', 'SLURM_NODELIST': 'x', 'MASTER_ADDR': 'h'}
    assert process_coordinates('slurm', slurm) == (5, 8, 1, 'h', '29500')
    mpi = {'OMPI_COMM_WORLD_RANK': '2', 'OMPI_COMM_WORLD_SIZE': '3', 'MASTER_ADDR': 'm', 'MASTER_PORT': '7'}
    assert process_coordinates('mpi', mpi) == (2, 3, 0, 'm', '7')
    with pytest.raises(ToolError, match='RANK, WORLD_SIZE.*tools/dist_train.sh'):
        process_coordinates('pytorch', {})


def test_cpu_multiprocess_runs_replace_gpu_only_sync_bn():
    from mmengine.config import Config
    cfg = Config.fromfile(str(DEEPLAB))
    assert replace_gpu_only_sync_bn(cfg.model) == ['model.decode_head.pool_norm_cfg']
    assert cfg.model.decode_head.pool_norm_cfg.type == 'BN' and cfg.model.decode_head.norm_cfg.type == 'SN'
    model = {'a': [dict(type='MMSyncBN'), dict(type='SyncSN')], 'b': dict(norm_cfg=dict(type='SyncBN'))}
    assert replace_gpu_only_sync_bn(model) == ['model.a.0', 'model.b.norm_cfg']
    assert model == {'a': [dict(type='BN'), dict(type='SyncSN')], 'b': dict(norm_cfg=dict(type='BN'))}


def test_cli_prints_one_line_and_exits_2():
    result = subprocess.run([sys.executable, 'tools/train.py', 'configs/demo/missing.py'], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ['error: config file not found: configs/demo/missing.py; pass the path '
                                          'of an existing config, e.g. '
                                          'configs/demo/mask-rcnn_r18-sn_fpn_1xb8-600i_shapes-128.py']
    for script in ('dist_train.sh', 'dist_test.sh', 'slurm_train.sh'):
        result = subprocess.run(['bash', f'tools/{script}'], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and result.stderr.startswith('error: missing arguments; usage: tools/')
    result = subprocess.run(['bash', 'tools/dist_train.sh', str(DEMO / 'x.py'), 'two'], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "NUM_PROCESSES must be a positive integer, got 'two'" in result.stderr


def test_slurm_train_composes_the_srun_command(tmp_path):
    fake_bin = tmp_path / 'bin'
    fake_bin.mkdir()
    srun = fake_bin / 'srun'
    srun.write_text('#!/usr/bin/env bash\n'
                    'printf "%s\\n" "$@" > "$SRUN_ARGS_FILE"\n'
                    'echo "MASTER_PORT=$MASTER_PORT" >> "$SRUN_ARGS_FILE"\n')
    srun.chmod(0o755)
    record = tmp_path / 'args.txt'
    env = dict(os.environ, PATH=f'{fake_bin}{os.pathsep}{os.environ["PATH"]}', SRUN_ARGS_FILE=str(record),
               GPUS='4', GPUS_PER_NODE='2', PORT='29601', PYTHON=sys.executable)
    result = subprocess.run(['bash', 'tools/slurm_train.sh', 'debug', 'job', 'cfg.py', 'work', '--cfg-options', 'a=1'],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args = record.read_text().splitlines()
    assert args[:7] == ['-p', 'debug', '--job-name=job', '--gres=gpu:2', '--ntasks=4', '--ntasks-per-node=2',
                        '--cpus-per-task=5']
    assert args[args.index(sys.executable):] == [sys.executable, '-u', f'{REPO}/tools/train.py', 'cfg.py',
                                                 '--work-dir=work', '--launcher=slurm', '--cfg-options', 'a=1',
                                                 'MASTER_PORT=29601']


def test_pretraining_batch_check_lines_and_errors():
    from mmengine.config import Config
    from norm_plugins.pretrained import PretrainingBatchMismatchWarning
    from norm_plugins.runner.config_setup import check_pretrained_backbones
    cfg = Config.fromfile(str(REPO / 'configs/mask_rcnn/mask-rcnn_r50-sn8x32-mismatched_fpn_sn-all_8xb2-2x_coco.py'))
    with pytest.warns(PretrainingBatchMismatchWarning):
        lines = check_pretrained_backbones(cfg)
    assert lines == ['model.backbone loads norm_plugins://resnet50_sn_8x32: pretrained with 32 images per GPU, '
                     'finetuning with 2 (differs)']
    cfg.model.backbone.depth = 101
    with pytest.raises(ToolError) as info:
        check_pretrained_backbones(cfg)
    assert '\n' not in str(info.value) and 'depth' in str(info.value)
