"""tools/dist_train.sh and tools/dist_test.sh with two CPU processes over gloo (torchrun), on the
SyncSN and the BCN demo configs: both ranks end with identical parameters and norm statistics
although each saw different images, which only synchronized batch statistics can give (the DDP
wrapper does not broadcast buffers)."""
import json
import textwrap

import pytest
import torch

from norm_plugins.testing import free_port
from tools_helpers import (FASTER_RCNN, PSPNET, REPO, make_tiny_shapes, run_tool, tiny_options,
                           tool_env)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU (gloo) path of the launcher')]
# config, its plug-in layer, the statistics it keeps, its own custom hooks, and whether to also run
# dist_test.sh on it
CASES = {'faster-rcnn-syncsn': (FASTER_RCNN, 'SyncSN', ('running_mean', 'running_var'), '', True),
         'pspnet-bcn-ws': (PSPNET, 'BCN', ('estimated_mean', 'estimated_var'),
                           "dict(type='BCNUpdateRateHook', factor=10.0), ", False)}


@pytest.mark.parametrize('case', list(CASES))
def test_dist_train_two_cpu_processes_keep_ranks_identical(case, tmp_path):
    base, layer, stat_names, own_hooks, evaluate = CASES[case]
    data_root = make_tiny_shapes(tmp_path / 'shapes')
    dumps = tmp_path / 'dumps'
    dumps.mkdir()
    config = tmp_path / f'{case}_rank_dump.py'
    config.write_text(textwrap.dedent(f"""\
        _base_ = '{base}'
        custom_imports = dict(imports=['norm_plugins', 'tools_rank_state_hook'], allow_failed_imports=False)
        custom_hooks = [{own_hooks}dict(type='RankStateDumpHook', out_dir='{dumps}')]
        """))
    work_dir = tmp_path / 'work'
    env = tool_env(extra_pythonpath=REPO / 'tests')
    env['PORT'] = str(free_port())
    result = run_tool(['tools/dist_train.sh', str(config), '2', '--work-dir', str(work_dir), '--cfg-options']
                      + tiny_options(base, data_root, max_iters=4, checkpoint_interval=4), cwd=REPO, env=env)
    output = result.stdout + result.stderr
    assert f'norm_plugins layers in the model: {layer} x' in output

    ranks = [torch.load(dumps / f'rank{r}.pth') for r in (0, 1)]
    for rank in ranks:
        assert rank['wrapper'] == 'MMDistributedDataParallel' and rank['backend'] == 'gloo'
        assert len(rank['image_ids']) == 4 * 2  # 4 iterations of 2 images
    assert not set(ranks[0]['image_ids']) & set(ranks[1]['image_ids']), 'the ranks saw the same images'

    states = [rank['state_dict'] for rank in ranks]
    assert states[0].keys() == states[1].keys()
    different = {k for k in states[0] if not torch.equal(states[0][k], states[1][k])}
    # PSPNet's global-pooling bin uses SyncBN, which runs as per-process BN on CPU: its statistics
    # must differ between the ranks (the control showing that unsynchronized statistics do).
    unsynced = {k for k in states[0] if '.bn.running_' in k}
    assert different == unsynced, f'ranks differ in {sorted(different - unsynced)[:10]}'
    if unsynced:
        assert "PyTorch's SyncBN runs on GPUs only" in output
    stats = [k for k in states[0] if k.endswith(stat_names)]
    assert len(stats) > 20
    # The statistics moved from their initial values (mean 0, variance 1): they were synchronized, not idle.
    assert all(states[0][k].abs().max() > 0 for k in stats if k.endswith(stat_names[0]))
    if not evaluate:
        return

    # Distributed evaluation of the checkpoint rank 0 wrote.
    metrics_json = tmp_path / 'metrics.json'
    env['PORT'] = str(free_port())
    run_tool(['tools/dist_test.sh', str(FASTER_RCNN), str(work_dir / 'iter_4.pth'), '2', '--work-dir',
              str(tmp_path / 'test'), '--metrics-json', str(metrics_json), '--cfg-options']
             + tiny_options(FASTER_RCNN, data_root), cwd=REPO, env=env)
    metrics = json.loads(metrics_json.read_text())['metrics']
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
