"""ONNX export of eval-mode models with SN, BCN and WSConv, checked against onnxruntime.

The layers' custom autograd functions are traced through by torch's dynamo-based exporter
(``torch.onnx.export(..., dynamo=True)``); the TorchScript exporter cannot export them.
"""
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn


def export_onnx(model: nn.Module, inputs: Tuple[Tensor, ...], path: str, opset: int = 18,
                dynamic_batch: bool = False) -> str:
    """Export ``model`` (put in eval mode) called on ``inputs`` to ``path``; returns ``path``."""
    model.eval()
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim('batch')
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    torch.onnx.export(model, tuple(inputs), path, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                      verbose=False)
    return path


def onnxruntime_outputs(path: str, inputs: Sequence[Tensor]) -> List[np.ndarray]:
    """Run the exported model with onnxruntime on CPU."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    feeds = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


@torch.no_grad()
def onnx_max_difference(model: nn.Module, path: str, inputs: Sequence[Tensor]) -> float:
    """Largest absolute difference between PyTorch's eval outputs and onnxruntime's."""
    model.eval()
    expected = model(*inputs)
    expected = [expected] if isinstance(expected, Tensor) else list(expected)
    actual = onnxruntime_outputs(path, inputs)
    if len(actual) != len(expected):
        raise ValueError(f'the ONNX model gives {len(actual)} outputs, PyTorch {len(expected)}')
    return max(float(np.abs(a - e.cpu().numpy()).max()) for a, e in zip(actual, expected))
