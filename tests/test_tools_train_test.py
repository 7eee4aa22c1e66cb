"""End to end: tools/train.py and tools/test.py on the demo configs (mmdet and mmseg) for a few
iterations on a tiny shapes dataset, evaluation from the saved checkpoint, and exact resumption
after the training process is killed."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mmengine.config import DictAction
from mmengine.runner import Runner, load_checkpoint

from norm_plugins.runner import mmengine_checkpoint_globals
from norm_plugins.runner.config_setup import load_config
from tools_helpers import MASK_RCNN, PSPNET, REPO, TOOL_TIMEOUT, make_tiny_shapes, run_tool, tiny_options, tool_env

pytestmark = pytest.mark.slow
MAX_ITERS = 4
CONFIGS = {'mask-rcnn-sn': MASK_RCNN, 'pspnet-bcn-ws': PSPNET}


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    return make_tiny_shapes(tmp_path_factory.mktemp('data') / 'shapes')


def _train_args(config: Path, work_dir: Path, data_root: Path):
    return ['tools/train.py', str(config), '--work-dir', str(work_dir), '--cfg-options'] + tiny_options(
        config, data_root, max_iters=MAX_ITERS, checkpoint_interval=2, deterministic=True)


@pytest.fixture(scope='module')
def uninterrupted(shapes_root, tmp_path_factory):
    """An uninterrupted deterministic run of each config: {name: (work_dir, stdout+stderr)}."""
    runs = {}
    for name, config in CONFIGS.items():
        work_dir = tmp_path_factory.mktemp(name)
        result = run_tool(_train_args(config, work_dir, shapes_root), cwd=REPO)
        runs[name] = (work_dir, result.stdout + result.stderr)
    return runs


def _load(path):
    with mmengine_checkpoint_globals():
        return torch.load(path, map_location='cpu')


def test_train_writes_checkpoints_and_logs_plugin_layers(uninterrupted):
    work_dir, output = uninterrupted['mask-rcnn-sn']
    assert (work_dir / f'iter_{MAX_ITERS}.pth').is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith(f'iter_{MAX_ITERS}.pth')
    assert 'norm_plugins layers in the model: SN x' in output
    assert f'Iter(train) [{MAX_ITERS}/{MAX_ITERS}]' in output and 'eta:' in output
    work_dir, output = uninterrupted['pspnet-bcn-ws']
    assert 'norm_plugins layers in the model: BCN x' in output and 'WSConv' in output
    # The BCN estimates moved away from their start (mean 0, variance 1) during the run.
    state = _load(work_dir / f'iter_{MAX_ITERS}.pth')['state_dict']
    means = [v for k, v in state.items() if k.endswith('estimated_mean')]
    assert means and any(m.abs().max() > 0 for m in means)


def _evaluate_in_process(config: Path, checkpoint: Path, options, work_dir: Path) -> dict:
    """The test metrics of ``checkpoint`` loaded strictly into the model of ``config`` in this process."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg = load_config(str(config), parser.parse_args(['--cfg-options'] + options).cfg_options)
    cfg.work_dir, cfg.load_from, cfg.launcher = str(work_dir), None, 'none'
    runner = Runner.from_cfg(cfg)
    with mmengine_checkpoint_globals():
        load_checkpoint(runner.model, str(checkpoint), map_location='cpu', strict=True)
    return runner.test()


def test_test_tool_evaluates_the_saved_checkpoints(uninterrupted, shapes_root, tmp_path):
    for name, metric in (('mask-rcnn-sn', ('coco/bbox_mAP', 'coco/segm_mAP')), ('pspnet-bcn-ws', ('mIoU',))):
        work_dir, _ = uninterrupted[name]
        out = tmp_path / f'{name}.json'
        checkpoint = work_dir / f'iter_{MAX_ITERS}.pth'
        options = tiny_options(CONFIGS[name], shapes_root)
        result = run_tool(['tools/test.py', str(CONFIGS[name]), str(checkpoint), '--work-dir', str(tmp_path / name),
                           '--metrics-json', str(out), '--cfg-options'] + options, cwd=REPO)
        summary = json.loads(out.read_text())
        assert summary['checkpoint'] == str(checkpoint) and Path(summary['log']).is_file()
        assert f'Load checkpoint from {checkpoint}' in result.stdout + result.stderr
        expected = _evaluate_in_process(CONFIGS[name], checkpoint, options, tmp_path / f'{name}-in-process')
        for key in metric:
            assert summary['metrics'][key] == pytest.approx(expected[key], abs=1e-3), key
        if name == 'pspnet-bcn-ws':
            assert expected['mIoU'] > 0  # the background class alone scores above 0


def _kill_after_first_checkpoint(args, work_dir: Path) -> str:
    process = subprocess.Popen([sys.executable] + args, cwd=REPO, env=tool_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    marker = work_dir / 'last_checkpoint'
    deadline = time.time() + TOOL_TIMEOUT
    try:
        while not (marker.is_file() and marker.read_text().strip()):
            assert process.poll() is None, f'training ended before its first checkpoint:\n{process.stdout.read()}'
            assert time.time() < deadline, 'no checkpoint within the time limit'
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return marker.read_text().strip()


@pytest.mark.parametrize('name', list(CONFIGS))
def test_killed_and_resumed_run_equals_uninterrupted_run(name, uninterrupted, shapes_root, tmp_path):
    args = _train_args(CONFIGS[name], tmp_path, shapes_root)
    killed_at = _kill_after_first_checkpoint(args, tmp_path)
    assert not (tmp_path / f'iter_{MAX_ITERS}.pth').exists(), 'the run finished before it was killed'
    resumed = run_tool(args[:4] + ['--resume'] + args[4:], cwd=REPO)
    resumed_iter = int(Path(killed_at).stem.split('_')[1])
    assert 0 < resumed_iter < MAX_ITERS
    assert f'Advance dataloader {resumed_iter} steps' in resumed.stdout + resumed.stderr

    reference = _load(uninterrupted[name][0] / f'iter_{MAX_ITERS}.pth')
    final = _load(tmp_path / f'iter_{MAX_ITERS}.pth')
    assert final['state_dict'].keys() == reference['state_dict'].keys()
    different = [k for k, v in reference['state_dict'].items() if not torch.equal(v, final['state_dict'][k])]
    assert not different, f'differs after resuming from iteration {resumed_iter}: {different[:10]}'
    # The comparison covers the norm statistics, not only the weights.
    kinds = {'mask-rcnn-sn': ('running_mean', 'running_var', 'mean_weight'),
             'pspnet-bcn-ws': ('estimated_mean', 'estimated_var')}[name]
    for kind in kinds:
        assert any(k.endswith(kind) for k in reference['state_dict']), kind
