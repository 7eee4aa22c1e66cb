"""GPU checks through the OpenMMLab toolboxes, marked ``cuda`` (skipped when torch sees no GPU;
tools/gpu_check.sh runs them once the stack is installed): the Mask R-CNN SN demo config trains 20
iterations on the GPU. The layers' GPU checks, which need torch alone, are in test_cuda.py."""
import json
import math

import pytest

from tools_helpers import MASK_RCNN, REPO, make_tiny_shapes, run_tool, tiny_options

pytestmark = pytest.mark.cuda


@pytest.mark.slow
def test_mask_rcnn_demo_trains_20_iterations_on_the_gpu(tmp_path):
    data = make_tiny_shapes(tmp_path / 'shapes')
    work_dir = tmp_path / 'work'
    run_tool(['tools/train.py', str(MASK_RCNN), '--work-dir', str(work_dir), '--cfg-options']
             + tiny_options(MASK_RCNN, data, max_iters=20, checkpoint_interval=20, batch_size=8), cwd=REPO)
    scalars = [json.loads(line) for path in work_dir.glob('*/vis_data/scalars.json')
               for line in path.read_text().splitlines()]
    train = [row for row in scalars if 'loss' in row]
    assert [row['iter'] for row in train] == list(range(1, 21))
    for row in train:
        losses = {k: v for k, v in row.items() if k.startswith('loss')}
        assert len(losses) >= 5 and all(math.isfinite(v) for v in losses.values()), row
        # mmengine logs the peak GPU memory only when training on CUDA.
        assert row.get('memory', 0) > 0, row
