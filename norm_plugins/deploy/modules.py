"""Inference-only layers that deployed norm layers turn into (plain tensor ops, ONNX-exportable)."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


@torch.no_grad()
def eval_affine(mean: Tensor, var: Tensor, eps: float, weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` in float64 with ``weight * (x - mean) / sqrt(var + eps) + bias = scale * x + shift``:
    a per-channel norm with constant statistics (SN's BN in eval, BCN's per-channel step, Eq. 40)."""
    scale = (var.double() + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


class ChannelAffine(nn.Module):
    """``y = scale_c * x + shift_c``: a norm whose statistics are constants (BN in eval), where no
    preceding convolution could absorb it."""

    def __init__(self, scale: Tensor, shift: Tensor):
        super().__init__()
        self.register_buffer('scale', scale.detach().clone())
        self.register_buffer('shift', shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(_per_channel(self.shift, x), x, _per_channel(self.scale, x))

    def extra_repr(self) -> str:
        return f'{self.scale.numel()}'
