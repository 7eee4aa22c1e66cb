"""SSN and SyncSSN on the Triton kernels (Triton's interpreter on CPU tensors) against the torch path and
the float64 layer: free, partly frozen and one-normalizer layers, groups, K = 2, half inputs and
channels-last, train then eval."""
import os

import pytest
import torch

from interpreter import require_interpreter

require_interpreter('tests/test_ssn_triton.py')

import test_sync_sparse_switchable_norm as sync_tests  # noqa: E402
from test_sparse_switchable_norm import _frozen, make_ssn  # noqa: E402
from test_triton_rowwise import check_layer_on_kernels, interpreter, launches, layer_step  # noqa: E402,F401

from norm_plugins.layers import SyncSparseSwitchableNorm  # noqa: E402
from norm_plugins.ops.backend import use_triton  # noqa: E402
from norm_plugins.testing import run_distributed  # noqa: E402

CONFIGS = {
    'default': dict(),
    'groups': dict(ratio_groups=2),
    'in-ln': dict(normalizers=('in', 'ln')),
    'tied': dict(tied=True),
    'unbiased': dict(unbiased_instance_var=True),
}


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('radius', [0.3, 0.75])
@pytest.mark.parametrize('config', list(CONFIGS))
def test_ssn_on_kernels(layer_step, config, radius, channels_last):
    layer = make_ssn(4, radius=radius, momentum=0.3, **CONFIGS[config])
    check_layer_on_kernels(layer_step, layer, (2, 4, 3, 5), channels_last)


@pytest.mark.parametrize('choices', [('bn', 'bn'), ('in', 'in'), ('ln', 'ln'), ('in', 'bn'), ('ln', 'in')])
def test_one_hot_layers_on_kernels(layer_step, choices):
    """The one-normalizer paths (only that normalizer's statistics) and mixed one-hot choices."""
    layer = _frozen([choices[0]], [choices[1]])
    check_layer_on_kernels(layer_step, layer, (2, 4, 3, 5))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_on_kernels(layer_step, dtype):
    check_layer_on_kernels(layer_step, make_ssn(4, cls=SyncSparseSwitchableNorm, radius=0.5), (2, 4, 3, 5),
                           channels_last=True, dtype=dtype)


def _sync_rank_on_kernels(rank, world, sizes, out_dir):
    assert os.environ.get('NORM_PLUGINS_BACKEND') == 'triton' and use_triton(torch.zeros(1))
    sync_tests._rank_run(rank, world, sizes, out_dir)


@pytest.mark.slow
def test_sync_ssn_on_kernels(monkeypatch, tmp_path):
    """SyncSSN on the kernels over gloo, one rank empty, freezing on the way, equals SSN on the
    concatenated batch (the torch path)."""
    sizes = (2, 0, 1)
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')  # the spawned ranks inherit it
    run_distributed(_sync_rank_on_kernels, len(sizes), sizes, str(tmp_path))
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'torch')
    sync_tests.check_against_ssn(tmp_path, sizes)
