"""Whether a forward is the recomputation of gradient checkpointing, which must not update statistics.

``torch.utils.checkpoint`` (mmdet/mmseg ``with_cp=True``) runs a block's forward twice: once for the
loss and once more inside ``backward`` to rebuild the activations it did not keep. A norm that
updates running statistics or estimates in forward would update them twice per step. So a layer
updates only when :func:`is_recomputing` is ``False``; one that normalizes with the estimates it has
just updated (micro-batch BCN) then finds them as the original forward left them, and so recomputes
exactly the constants that produced the loss.

The recomputation is recognized by the autograd engine running a graph task in this thread: both
kinds of checkpoint recompute inside ``backward`` (the reentrant kind in its own ``backward`` node,
the non-reentrant kind in the unpack hook of a saved tensor), while an ordinary forward, also one
under ``torch.no_grad`` (the reentrant kind's first forward, batch-average recomputation of the
statistics, ``torch.optim.swa_utils.update_bn``), runs outside any graph task. A forward called from
a gradient hook is treated as a recomputation too; nothing in training does that.

While torch.compile traces, the answer is ``False``: the engine's state is a Python int that Dynamo
cannot put in a graph (asking would break it), and a traced forward is an original one. A
checkpointed block inside a compiled region is recomputed by the compiled graph itself.
"""
import torch


def is_recomputing() -> bool:
    """True while the autograd engine executes a backward in this thread (checkpoint recomputation).

    Layers skip their running-statistics updates then; see the module docstring.
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
