"""BCN (both modes) on the Triton kernels, run on CPU tensors through Triton's interpreter, against
the torch path: outputs, input and parameter gradients, statistics and estimates, over the shape cases
of BCN (1D/3D, N = 0, N = 1, 1x1 maps, L not a multiple of the block); test_triton_rowwise.py covers
the common 2D case, half inputs and the large-offset bound on the kernels."""
import copy

import pytest
import torch

from interpreter import require_interpreter

require_interpreter('tests/test_bcn_triton.py')

from norm_plugins import BatchChannelNorm  # noqa: E402
from norm_plugins.ops import triton_rowwise  # noqa: E402


def _step(backend, monkeypatch, layer, x, grad_out, steps=2):
    """``steps`` training steps (estimates and running statistics move), then one in eval."""
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', backend)
    calls, passes = [], ('row_moments', 'row_normalize', 'row_grad_sums', 'row_normalize_backward')
    for name in passes:
        kernel = getattr(triton_rowwise, name)
        monkeypatch.setattr(triton_rowwise, name, lambda *args, kernel=kernel, name=name: calls.append(name)
                            or kernel(*args))
    results = []
    for mode in ['train'] * steps + ['eval']:
        layer.train(mode == 'train')
        layer.zero_grad()
        xs = x.clone().requires_grad_()
        y = layer(xs)
        y.backward(grad_out)
        results.append((y, xs.grad, [p.grad for p in layer.parameters()],
                        [b.clone() for b in layer.buffers()]))
    assert set(calls) == (set(passes) if backend == 'triton' else set())  # all four passes, or none
    return results


@pytest.mark.parametrize('shape,estimate,dtype,channels_last', [
    ((3, 8, 33), False, torch.float32, False),      # 1D, L not a multiple of the block
    ((1, 8, 1, 1), True, torch.float32, False),      # N = 1, L = 1
    ((2, 8, 1, 1), False, torch.float32, True),
    ((0, 8, 3, 3), False, torch.float32, False),     # empty batch
    ((2, 8, 2, 3, 4), True, torch.float32, False),   # 3D
    ((2, 8, 4, 6), False, torch.bfloat16, True),
])
def test_triton_backend_matches_torch_path(shape, estimate, dtype, channels_last, monkeypatch):
    torch.manual_seed(0)
    layer = BatchChannelNorm(8, num_groups=4, estimate=estimate, update_rate=0.3)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.3 * torch.randn(param.shape))
    x = (torch.randn(shape) * 2 + 3).to(dtype)
    grad_out = torch.randn(shape).to(dtype)
    if channels_last:
        x, grad_out = (t.to(memory_format=torch.channels_last) for t in (x, grad_out))
    reference = _step('torch', monkeypatch, copy.deepcopy(layer), x, grad_out)
    kernels = _step('triton', monkeypatch, layer, x, grad_out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for (y, dx, dparams, buffers), (y_ref, dx_ref, dparams_ref, buffers_ref) in zip(kernels, reference):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
        assert dx.is_contiguous(memory_format=layout)
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(dx, dx_ref, **tol)
        for got, expected in zip(dparams + buffers, dparams_ref + buffers_ref):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

