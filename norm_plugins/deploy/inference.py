"""Synthetic inputs, output comparison and timing of mmdet/mmseg models, for checking a deployment."""
import copy
import time
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn


def synthetic_batch(model: nn.Module, height: int, width: int, batch_size: int = 1,
                    seed: int = 0) -> Tuple[Tensor, list]:
    """A normalized random image batch and its data samples (mmdet/mmseg meta info) for ``model``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, 3, height, width, generator=generator)
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width), scale_factor=(1.0, 1.0), img_id=0)
    samples = []
    if _scope(model) == 'mmdet':
        from mmdet.structures import DetDataSample
        samples = [DetDataSample(metainfo=dict(meta, img_id=i)) for i in range(batch_size)]
    elif _scope(model) == 'mmseg':
        from mmseg.structures import SegDataSample
        samples = [SegDataSample(metainfo=dict(meta, padding_size=[0, 0, 0, 0])) for _ in range(batch_size)]
    device = next(model.parameters()).device
    return inputs.to(device), samples


def _scope(model: nn.Module) -> str:
    return type(model).__module__.split('.')[0]


def _tensors(output: Any) -> List[Tensor]:
    """The tensors of a (nested) output; ``None`` holds none. Anything else would go uncompared."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _tensors(value)]
    if output is None:
        return []
    raise TypeError(f'the network output holds a {type(output).__name__}, which cannot be compared; the check '
                    "needs tensors (mmengine models: mode='tensor')")


@torch.no_grad()
def fixed_proposals(model: nn.Module, inputs: Tensor, samples: list) -> Optional[list]:
    """The RPN proposals of a two-stage detector (None for other models), to feed the RoI heads of
    two models the same boxes: NMS would turn float rounding into different boxes."""
    if not (getattr(model, 'with_rpn', False) and hasattr(model, 'roi_head')):
        return None
    model.eval()
    return model.rpn_head.predict(model.extract_feat(inputs), copy.deepcopy(samples), rescale=False)


@torch.no_grad()
def network_outputs(model: nn.Module, inputs: Tensor, samples: list, proposals: Optional[list] = None) -> List[Tensor]:
    """Every tensor the network computes before post-processing, in eval mode.

    mmengine models: ``mode='tensor'``; with ``proposals`` (two-stage detectors), the backbone and
    neck features, the RPN head outputs and the RoI head outputs on those proposals. Plain modules:
    ``model(inputs)``.
    """
    model.eval()
    if proposals is not None:
        features = model.extract_feat(inputs)
        return _tensors([features, model.rpn_head(features),
                         model.roi_head.forward(features, proposals, copy.deepcopy(samples))])
    if samples:
        return _tensors(model(inputs, copy.deepcopy(samples), mode='tensor'))
    return _tensors(model(inputs))


def _to_double(proposals: Optional[list]) -> Optional[list]:
    if proposals is None:
        return None
    doubled = []
    for result in proposals:
        result = result.clone()
        result.bboxes = result.bboxes.double()
        doubled.append(result)
    return doubled


def deployment_differences(reference: nn.Module, deployed: nn.Module, inputs: Tensor,
                           samples: list) -> Tuple[float, float, float]:
    """How far ``deployed`` is from ``reference`` (the model before :func:`deploy_model`).

    Returns the largest output difference (1) of the conversion itself: both deployed in float64
    from the reference, (2) of the given models in their dtype, and (3) of the reference in its
    dtype from the reference in float64, the rounding that (2) is to be judged against.
    """
    from .convert import deploy_model
    proposals = fixed_proposals(reference, inputs, samples)
    proposals64, inputs64 = _to_double(proposals), inputs.double()
    reference64 = copy.deepcopy(reference).double()
    outputs64 = network_outputs(reference64, inputs64, samples, proposals64)
    outputs = network_outputs(reference, inputs, samples, proposals)
    deployed64 = copy.deepcopy(reference64)
    deploy_model(deployed64)
    exact = max_difference(outputs64, network_outputs(deployed64, inputs64, samples, proposals64))
    own = max_difference(outputs, network_outputs(deployed, inputs, samples, proposals))
    return exact, own, max_difference(outputs, outputs64)


def max_difference(first: List[Tensor], second: List[Tensor]) -> float:
    """Largest absolute difference between corresponding tensors.

    Raises:
        ValueError: different structure or shapes, or no element to compare (0.0 would claim a match).
    """
    if len(first) != len(second) or any(a.shape != b.shape for a, b in zip(first, second)):
        raise ValueError('the two models give outputs of different structure or shape')
    compared = [(a, b) for a, b in zip(first, second) if a.numel()]
    if not compared:
        raise ValueError(f'nothing to compare: the models gave {len(first)} output tensor(s), all empty; use an '
                         'input on which the network produces outputs (--input-size)')
    return max(float((a.double() - b.double()).abs().max()) for a, b in compared)


@torch.no_grad()
def time_inference(models: List[nn.Module], inputs: Tensor, samples: list, runs: int = 5) -> List[float]:
    """Seconds of one full inference (``predict`` for mmengine models) of each model: the fastest of
    ``runs`` after a warm-up run. The models take turns, so load from other processes on a shared
    machine affects them alike, and the fastest run is the least disturbed one."""
    for model in models:
        model.eval()

    def once(model):
        if samples:
            model(inputs, copy.deepcopy(samples), mode='predict')
        else:
            model(inputs)

    def sync():
        # CUDA kernels run asynchronously: without a barrier the clock stops before they finish.
        if inputs.device.type == 'cuda':
            torch.cuda.synchronize(inputs.device)

    for model in models:
        once(model)
    best = [float('inf')] * len(models)
    for _ in range(runs):
        for i, model in enumerate(models):
            sync()
            start = time.perf_counter()
            once(model)
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
