"""Argument and input checks shared by the norm layers, with messages that name the fix."""
import math
from typing import Optional

from torch import Tensor


def check_norm_args(owner: str, num_features: int, eps: float, momentum: Optional[float]) -> None:
    if not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f'{owner}: num_features must be a positive int, got {num_features!r}')
    if not eps > 0:
        raise ValueError(f'{owner}: eps must be > 0 (it keeps 1/sqrt(var + eps) finite), got {eps}')
    if momentum is not None and not 0 <= momentum <= 1:
        raise ValueError(f'{owner}: momentum must be in [0, 1] (PyTorch convention: weight of the '
                         f'new batch) or None for a cumulative average, got {momentum}')


def check_ratio_groups(owner: str, ratio_groups: int, num_features: int) -> None:
    if isinstance(ratio_groups, bool) or not isinstance(ratio_groups, int) or ratio_groups < 1:
        raise ValueError(f'{owner}: ratio_groups must be a positive int (1: one ratio vector for all '
                         f'channels), got {ratio_groups!r}')
    if num_features % ratio_groups:
        raise ValueError(f'{owner}: ratio_groups={ratio_groups} does not divide num_features={num_features}; '
                         f'choose a divisor of {num_features} (e.g. 2).')


def check_group_size(owner: str, group_size: Optional[int]) -> None:
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f'{owner}: group_size must be a positive int or None (whole world), '
                         f'got {group_size!r}')


def check_norm_input(owner: str, x: Tensor, num_features: int) -> None:
    """x must be (N, C, L), (N, C, H, W) or (N, C, D, H, W) with C == num_features and L, H, W > 0."""
    if x.dim() not in (3, 4, 5):
        raise ValueError(f'{owner} expects an (N, C, L), (N, C, H, W) or (N, C, D, H, W) input, got '
                         f'shape {tuple(x.shape)}; flatten extra dims or add a spatial dim.')
    if x.shape[1] != num_features:
        raise ValueError(f'{owner} was built for {num_features} channels but the input has '
                         f'{x.shape[1]} (shape {tuple(x.shape)}); set num_features to the '
                         'channel count of the layer before it.')
    if math.prod(x.shape[2:]) == 0:
        raise ValueError(f'{owner} got an input with no spatial positions, shape {tuple(x.shape)}')
