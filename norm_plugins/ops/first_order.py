"""Backward functions without a second derivative, refusing one instead of returning zeros."""
import functools

import torch


def first_order_only(backward):
    """Decorate ``torch.autograd.Function.backward``: raise when a second derivative is requested.

    ``torch.autograd.function.once_differentiable`` raises only when the second differentiation
    passes through the incoming gradient; differentiating the input gradient with respect to the
    input itself (``gradgradcheck``, a gradient penalty on a linear loss) silently gives zeros,
    because the hand-written backward reads x from the saved tensors without building a graph.
    Here any backward that must build a graph (``create_graph=True``) raises, naming the layer.
    """
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f'{type(ctx).__name__.removesuffix("Backward")}: second derivatives are not implemented, so '
                'backward(create_graph=True) / torch.autograd.grad(create_graph=True) through this layer (a '
                'gradient penalty, gradgradcheck) is refused; compute the penalty without it or use a norm '
                'layer written in plain autograd.')
        return backward(ctx, *grads)
    return wrapper
