"""Weight Standardization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", Sec. 4, Eq. 5-7).

Every forward convolves with the weight standardized per output channel i over its
I = in_channels / groups * prod(kernel_size) entries j; gradients flow through the standardization
(Eq. 14-15)::

    formula='paper' (Eq. 7):   W_hat_ij = (W_ij - mean_i) / sqrt(var_i + eps),       var biased
    formula='convws':          W_hat_ij = (W_ij - mean_i) / (std_i + eps),           std unbiased
    formula='bcn':             W_hat_ij = (W_ij - mean_i) / sqrt(var_i + eps),       var unbiased

'convws' is the authors' released code and mmcv's ``ConvWS``, which the released GN+WS checkpoints
were trained with; 'bcn' is the authors' BCN ImageNet code, which trained the BCN+WS checkpoints. 'paper' keeps a constant filter finite (it maps to 0 with finite gradients);
'convws' does too here because std is taken of the variance clamped at a tiny positive value,
which changes the forward by at most 1e-15.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMULAS = ('paper', 'convws', 'bcn')
# Smallest variance whose square root is taken in 'convws' mode: sqrt is not differentiable at 0.
_TINY_VAR = 1e-30


def standardize_weight(weight: Tensor, eps: float = 1e-5, formula: str = 'paper') -> Tensor:
    """Standardize ``weight`` (O, I/groups, *kernel) per output channel, differentiably."""
    flat = weight.flatten(1)
    if formula == 'paper':
        # Eq. 7 is exactly a layer norm over each output channel's row: one fused kernel each way.
        standardized = F.layer_norm(flat, flat.shape[1:], eps=eps)
    elif formula == 'convws':
        var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=1)
        standardized = (flat - mean) / (var.clamp(min=_TINY_VAR).sqrt() + eps)
    elif formula == 'bcn':
        var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=1)
        standardized = (flat - mean) * (var + eps).rsqrt()
    else:
        raise ValueError(f'unknown weight standardization formula {formula!r}; choose from {FORMULAS}')
    return standardized.view_as(weight)


class _WSConvMixin:
    """Weight standardization on top of a ``torch.nn`` convolution class."""

    _plain_conv: type

    def __init__(self, *args, eps: float = 1e-5, formula: str = 'paper', **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if formula not in FORMULAS:
            raise ValueError(f"{name}: unknown formula {formula!r}; choose 'paper' (Eq. 7 of the paper, "
                             "default), 'convws' (the authors' GN+WS code and mmcv ConvWS) or 'bcn' "
                             "(the authors' BCN code).")
        if not eps > 0:
            raise ValueError(f'{name}: eps must be > 0 (it keeps a constant filter finite), got {eps}')
        if self.weight[0].numel() == 1:
            raise ValueError(f'{name}: each filter has a single weight (in_channels/groups='
                             f'{self.in_channels // self.groups}, kernel_size={self.kernel_size}), which '
                             'standardization maps to 0, and the output with it; use a plain convolution '
                             'for this layer.')
        self.eps = eps
        self.formula = formula

    def standardized_weight(self) -> Tensor:
        return standardize_weight(self.weight, self.eps, self.formula)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """A plain ``nn.Conv{1,2,3}d`` holding the standardized weight: same outputs, no WS cost."""
        plain = self._plain_conv(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
            padding_mode=self.padding_mode, device=self.weight.device, dtype=self.weight.dtype)
        plain.weight.copy_(self.standardized_weight())
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, eps={self.eps}, formula={self.formula!r}'


class WSConv1d(_WSConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with Weight Standardization, ``conv_cfg=dict(type='WSConv1d')``.

    Args: as ``nn.Conv1d``, plus ``eps`` (1e-5) and ``formula`` ('paper', 'convws' or 'bcn', see module doc).
    """
    _plain_conv = nn.Conv1d


class WSConv2d(_WSConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with Weight Standardization, ``conv_cfg=dict(type='WSConv')`` (or 'WSConv2d').

    Args: as ``nn.Conv2d``, plus ``eps`` (1e-5) and ``formula`` ('paper', 'convws' or 'bcn', see module doc).
    """
    _plain_conv = nn.Conv2d


class WSConv3d(_WSConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with Weight Standardization, ``conv_cfg=dict(type='WSConv3d')``.

    Args: as ``nn.Conv3d``, plus ``eps`` (1e-5) and ``formula`` ('paper', 'convws' or 'bcn', see module doc).
    """
    _plain_conv = nn.Conv3d
