"""Inference-only layers that deployed norm layers turn into (plain tensor ops, ONNX-exportable)."""
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.moments import instance_moments


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


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


class SelectedNorm(nn.Module):
    """SN with one-hot ratios whose selection no standard layer expresses: the mean from one
    normalizer and the variance from another, or the authors' unbiased instance variance.

        y = weight * (x - mu_m) / sqrt(var_v + eps) + bias,   m, v in {'in', 'ln', 'bn'}

    IN and LN statistics come from the sample (LN's derived from IN's as in SN, Eq. 4), BN from the
    constant ``running_mean``/``running_var``. Only the statistics the selection needs are computed.
    """

    def __init__(self, mean_source: str, var_source: str, eps: float, weight: Optional[Tensor],
                 bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 unbiased_instance_var: bool = False):
        super().__init__()
        if 'bn' in (mean_source, var_source) and running_mean is None:
            raise ValueError('SelectedNorm: a BN selection needs running statistics')
        self.mean_source, self.var_source = mean_source, var_source
        self.eps = eps
        self.unbiased_instance_var = unbiased_instance_var
        for name, value in (('weight', weight), ('bias', bias)):
            self.register_parameter(name, None if value is None else nn.Parameter(value.detach().clone()))
        for name, value in (('running_mean', running_mean), ('running_var', running_var)):
            self.register_buffer(name, None if value is None else value.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        stats = {}
        out = None
        if {self.mean_source, self.var_source} & {'in', 'ln'}:
            # One pass for the instance moments; its normalized copy is reused as the output buffer.
            mu_in, var_in, out = instance_moments(x3)
            spatial = x3.shape[2]
            if self.unbiased_instance_var and spatial > 1:
                var_in = var_in * (spatial / (spatial - 1))
            mu_ln = mu_in.mean(1, keepdim=True)
            stats['in'] = (mu_in, var_in)
            stats['ln'] = (mu_ln, (var_in + (mu_in - mu_ln).square()).mean(1, keepdim=True))
        if self.running_mean is not None:
            stats['bn'] = (self.running_mean.view(1, -1), self.running_var.view(1, -1))
        mean, var = stats[self.mean_source][0], stats[self.var_source][1]
        scale = (var + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        scale, shift = scale.expand(n, c).unsqueeze(-1), shift.expand(n, c).unsqueeze(-1)
        if out is None or torch.is_grad_enabled():  # out= is not differentiable
            return torch.addcmul(shift, x3, scale).view(x.shape)
        return torch.addcmul(shift, x3, scale, out=out).view(x.shape)

    def extra_repr(self) -> str:
        return (f'mean={self.mean_source.upper()}, var={self.var_source.upper()}, eps={self.eps}, '
                f'unbiased_instance_var={self.unbiased_instance_var}')
