"""tools/benchmark_norm.py: the SN-plain row computes Switchable Normalization, and ``--backend``
measures norm_plugins layers under each backend side by side (CPU, tiny shapes)."""
import importlib.util
import math
import os

import pytest
import torch

from norm_plugins import SwitchableNorm
from tools_helpers import REPO


def load_tool():
    path = REPO / 'tools' / 'benchmark_norm.py'
    spec = importlib.util.spec_from_file_location('benchmark_norm', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_sn_is_switchable_norm(monkeypatch):
    """SN-plain (paper Eq. 2-5 in plain autograd) agrees with SwitchableNorm in training: output,
    input and parameter gradients, running statistics."""
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'torch')
    tool = load_tool()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    plain, sn = tool.PlainSwitchableNorm(4).double(), SwitchableNorm(4).double()
    with torch.no_grad():
        for name in ('weight', 'bias', 'mean_weight', 'var_weight'):
            getattr(plain, name).copy_(torch.randn(getattr(plain, name).shape, generator=gen))
            getattr(sn, name).copy_(getattr(plain, name))
    outputs = []
    for layer in (plain, sn):
        x.grad = None
        y = layer(x)
        y.backward(grad)
        outputs.append([y, x.grad, layer.weight.grad, layer.bias.grad, layer.mean_weight.grad,
                        layer.var_weight.grad, layer.running_mean, layer.running_var])
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_backends_side_by_side(monkeypatch, capsys):
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    backend_before = os.environ.get('NORM_PLUGINS_BACKEND')
    tool = load_tool()
    rows = tool.main(['--layers', 'GN', 'SN-plain', 'SN', '--shapes', '2x32x3x5',
                      '--dtypes', 'float32', '--warmup', '0', '--repeats', '1',
                      '--backend', 'torch', 'triton'])
    assert [(r['layer'], r['backend']) for r in rows] == [
        ('GN', '-'), ('SN-plain', '-'), ('SN', 'torch'), ('SN', 'triton')]
    assert all(math.isfinite(r['ms']) and r['ms'] > 0 and r['memory'] > 0 for r in rows), rows
    table = capsys.readouterr().out.splitlines()
    assert any(line.startswith('| layer | backend | shape | dtype | fwd+bwd ms | x BN | x GN |')
               for line in table)
    sn_triton = next(line for line in table if line.startswith('| SN | triton |'))
    ratio_to_gn = float(sn_triton.split('|')[7])
    assert ratio_to_gn == pytest.approx(rows[3]['ms'] / rows[0]['ms'], abs=0.01)
    assert os.environ.get('NORM_PLUGINS_BACKEND') == backend_before


def test_triton_on_cpu_needs_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(SystemExit):
        load_tool().main(['--backend', 'triton', '--layers', 'SN'])
    assert 'TRITON_INTERPRET=1' in capsys.readouterr().err
