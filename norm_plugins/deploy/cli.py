"""``tools/deploy.py``: an inference-only model from a config and a checkpoint, checked and timed."""
import argparse
import copy
import os.path as osp
from typing import List, Optional

import torch
from mmengine.config import DictAction
from torch import nn

from ..analysis.model_io import build_model
from ..layers.switchable_norm import SwitchableNorm
from ..runner.errors import ToolError
from .convert import deploy_model, describe
from .inference import deployment_differences, synthetic_batch, time_inference
from .onnx_export import export_onnx, onnx_max_difference


class FeatureExtractor(nn.Module):
    """``model.extract_feat`` (backbone and neck) as a module, for ONNX export of mmdet/mmseg models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return self.model.extract_feat(inputs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Turn a trained model into an inference-only equivalent: WSConv folded, '
                                            'SN with one-hot ratios replaced by the normalizer it selects (BN folded '
                                            'into the preceding conv), BCN folded. Checks that eval outputs match.')
    p.add_argument('config', help='the config the checkpoint was trained with')
    p.add_argument('checkpoint', help='trained checkpoint (.pth)')
    p.add_argument('--out', help='where to save the deployed model (a pickled nn.Module; load it with '
                                 'torch.load(path, weights_only=False))')
    p.add_argument('--harden', action='store_true',
                   help='fix SN ratios to their argmax first, and freeze the free vectors of SSN (changes outputs unless '
                        'finetuned with hard ratios, or all SSN vectors froze in training)')
    p.add_argument('--input-size', type=int, nargs=2, default=(512, 512), metavar=('H', 'W'),
                   help='synthetic input size for the check, the timing and the ONNX export')
    p.add_argument('--tolerance', type=float, default=1e-5, help='largest allowed eval output difference (float64)')
    p.add_argument('--benchmark', type=int, default=0, metavar='RUNS',
                   help='time full inference before and after deployment (best of RUNS, taking turns, after a warm-up)')
    p.add_argument('--onnx', help='also export the deployed backbone+neck (extract_feat) to this ONNX file and '
                                  'check it with onnxruntime')
    p.add_argument('--device', default='cpu', help='device to run on (cpu, cuda)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    return p


def main(argv: Optional[List[str]] = None) -> nn.Module:
    args = parser().parse_args(argv)
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise ToolError(f'{what} not found: {path}')
    model = build_model(args.config, args.checkpoint, args.cfg_options).to(args.device)
    model.eval()
    if args.harden:
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                module.harden()
    reference = copy.deepcopy(model)
    report = deploy_model(model)
    print('deployed layers:\n  ' + '\n  '.join(describe(report) or ['nothing to convert']))
    inputs, samples = synthetic_batch(model, *args.input_size)
    try:
        exact, own, rounding = deployment_differences(reference, model, inputs, samples)
    except (TypeError, ValueError) as error:
        raise ToolError(f'cannot check the deployed model: {error}; nothing saved') from None
    size = f'{args.input_size[0]}x{args.input_size[1]}'
    print(f'largest eval output difference on a {size} input: {exact:.3g} when converted in float64; '
          f'{own:.3g} in {inputs.dtype}, where the original alone is {rounding:.3g} away from float64')
    if not exact <= args.tolerance:
        raise ToolError(f'the deployed model differs from the original by {exact:.3g} > --tolerance '
                        f'{args.tolerance:g} in float64; nothing saved')
    if args.benchmark:
        before, after = time_inference([reference, model], inputs, samples, args.benchmark)
        print(f'inference ({args.device}, best of {args.benchmark}, {torch.get_num_threads()} threads): '
              f'{before * 1000:.1f} ms -> {after * 1000:.1f} ms, speedup {before / after:.2f}x')
    if args.onnx:
        features = FeatureExtractor(model)
        export_onnx(features, (inputs,), args.onnx)
        print(f'ONNX backbone+neck written to {args.onnx}; largest onnxruntime difference: '
              f'{onnx_max_difference(features, args.onnx, (inputs,)):.3g}')
    if args.out:
        torch.save(model, args.out)
        print(f'deployed model saved to {args.out}')
    return model
