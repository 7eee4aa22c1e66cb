"""Inference-only models: folded WSConv, SN with hard ratios as the normalizer it selects, folded
BCN; ONNX export."""
from .convert import deploy_model, describe
from .modules import ChannelAffine, eval_affine
from .onnx_export import export_onnx, onnx_max_difference, onnxruntime_outputs

__all__ = ['ChannelAffine', 'deploy_model', 'describe', 'eval_affine', 'export_onnx', 'onnx_max_difference',
           'onnxruntime_outputs']
