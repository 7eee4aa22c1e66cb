"""tools/dist_train.sh and tools/dist_test.sh with two CPU processes over gloo (torchrun), on the
SyncSN demo config: both ranks end with identical parameters and SyncSN statistics although each
saw different images, which only the synchronized batch statistics can give (buffers are not
broadcast by the DDP wrapper)."""
import json
import textwrap

import pytest
import torch

from tools_helpers import (FASTER_RCNN, REPO, make_tiny_shapes, free_port, run_tool, tiny_options,
                           tool_env)

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU (gloo) path of the launcher')
def test_dist_train_two_cpu_processes_keep_syncsn_ranks_identical(tmp_path):
    data_root = make_tiny_shapes(tmp_path / 'shapes')
    dumps = tmp_path / 'dumps'
    dumps.mkdir()
    config = tmp_path / 'faster-rcnn_syncsn_rank_dump.py'
    config.write_text(textwrap.dedent(f"""\
        _base_ = '{FASTER_RCNN}'
        custom_imports = dict(imports=['norm_plugins', 'tools_rank_state_hook'], allow_failed_imports=False)
        custom_hooks = [dict(type='RankStateDumpHook', out_dir='{dumps}')]
        """))
    work_dir = tmp_path / 'work'
    env = tool_env(extra_pythonpath=REPO / 'tests')
    env['PORT'] = str(free_port())
    result = run_tool(['tools/dist_train.sh', str(config), '2', '--work-dir', str(work_dir), '--cfg-options']
                      + tiny_options(FASTER_RCNN, data_root, max_iters=4, checkpoint_interval=4), cwd=REPO, env=env)
    output = result.stdout + result.stderr
    assert 'norm_plugins layers in the model: SyncSN x' in output

    ranks = [torch.load(dumps / f'rank{r}.pth') for r in (0, 1)]
    for rank in ranks:
        assert rank['wrapper'] == 'MMDistributedDataParallel' and rank['backend'] == 'gloo'
        assert len(rank['image_ids']) == 4 * 2  # 4 iterations of 2 images
    assert not set(ranks[0]['image_ids']) & set(ranks[1]['image_ids']), 'the ranks saw the same images'

    states = [rank['state_dict'] for rank in ranks]
    assert states[0].keys() == states[1].keys()
    different = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not different, f'ranks differ in {different[:10]}'
    stats = [k for k in states[0] if k.endswith(('running_mean', 'running_var'))]
    assert len(stats) > 20
    # The statistics moved from their initial values (mean 0, variance 1): they were synchronized, not idle.
    assert all(states[0][k].abs().max() > 0 for k in stats if k.endswith('running_mean'))

    # Distributed evaluation of the checkpoint rank 0 wrote.
    metrics_json = tmp_path / 'metrics.json'
    env['PORT'] = str(free_port())
    run_tool(['tools/dist_test.sh', str(FASTER_RCNN), str(work_dir / 'iter_4.pth'), '2', '--work-dir',
              str(tmp_path / 'test'), '--metrics-json', str(metrics_json), '--cfg-options']
             + tiny_options(FASTER_RCNN, data_root), cwd=REPO, env=env)
    metrics = json.loads(metrics_json.read_text())['metrics']
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
