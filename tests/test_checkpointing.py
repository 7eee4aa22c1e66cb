"""Gradient checkpointing: a recomputed forward updates no statistics, and gradients equal the plain ones."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from norm_plugins.ops.recompute import is_recomputing


class _Probe(torch.nn.Module):
    """Records is_recomputing() at every forward; x * x saves x, so the non-reentrant kind recomputes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(is_recomputing())
        return x * x


@pytest.mark.parametrize('use_reentrant', [True, False])
def test_is_recomputing_only_inside_the_checkpoint_backward(use_reentrant):
    probe = _Probe()
    x = torch.randn(3, requires_grad=True)
    checkpoint(probe, x, use_reentrant=use_reentrant).sum().backward()
    assert probe.calls == [False, True]


def test_plain_and_no_grad_forwards_are_not_recomputations():
    probe = _Probe()
    probe(torch.randn(3, requires_grad=True)).sum().backward()
    with torch.no_grad():
        probe(torch.randn(3))
    assert probe.calls == [False, False]
