"""tools/benchmark_e2e.py --small on the CPU: every model with every norm, one Markdown table."""
import importlib.util
import math
from collections import OrderedDict

import pytest
from mmengine.logging import MMLogger

from tools_helpers import REPO

pytestmark = pytest.mark.slow


def load_tool():
    spec = importlib.util.spec_from_file_location('benchmark_e2e', REPO / 'tools' / 'benchmark_e2e.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_run_prints_every_model_and_norm(capsys, monkeypatch):
    tool = load_tool()
    # The tool makes its quiet logger mmengine's current one: keep that out of later tests.
    monkeypatch.setattr(MMLogger, '_instance_dict', OrderedDict(MMLogger._instance_dict))
    rows = tool.main(['--small', '--device', 'cpu', '--iters', '1', '--warmup', '0'])
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith('| model |'))
    assert 'iteration ms' in table[header] and 'saved for backward GiB' in table[header]
    cells = [[c.strip() for c in line.strip('|').split('|')] for line in table[header + 2:] if line.startswith('|')]
    expected = {(model, norm) for model in tool.MODELS for norm in tool.NORMS}
    assert {(c[0], c[2]) for c in cells} == expected and len(cells) == len(expected)
    inputs = {'mask_rcnn': '2x128x128', 'deeplabv3': '2x65x65'}
    for model, size, norm, ms, ms_ratio, memory, memory_ratio in cells:
        assert size == inputs[model]
        numbers = [float(ms), float(ms_ratio), float(memory), float(memory_ratio)]
        assert all(math.isfinite(v) and v > 0 for v in numbers), (model, norm, numbers)
        if norm == tool.BASELINE:
            assert float(ms_ratio) == 1 and float(memory_ratio) == 1
    saved = {(r['model'], r['norm']): r['memory'] for r in rows}
    # Each norm sits where its recipe puts it. Frozen BN (mmdet's default) saves nothing for backward
    # in the backbone's norms and has no convolutions in its 2fc box head: the least of Mask R-CNN's.
    assert all(saved['mask_rcnn', norm] > saved['mask_rcnn', 'BN'] for norm in tool.NORMS if norm != 'BN')
    # WS keeps every convolution's standardized weight for backward.
    for model in tool.MODELS:
        assert saved[model, 'GN+WS'] > saved[model, 'GN']


def test_cuda_without_gpu_is_a_clear_error(capsys, monkeypatch):
    tool = load_tool()
    monkeypatch.setattr(tool.torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit):
        tool.main(['--device', 'cuda'])
    assert 'torch sees no GPU' in capsys.readouterr().err
