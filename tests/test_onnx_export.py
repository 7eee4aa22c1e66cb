"""ONNX export of eval-mode models with SN, BCN and WSConv; onnxruntime reproduces PyTorch."""
import copy

# Pinned requirements: a broken install fails these imports instead of skipping the tests.
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import onnxscript  # noqa: F401
import torch
from torch import nn

import norm_plugins  # noqa: F401 - registers the layers
from norm_plugins.deploy import deploy_model, export_onnx, onnx_max_difference
from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        WSConv2d(3, 8, 3, padding=1), SwitchableNorm(8), nn.ReLU(),
        WSConv2d(8, 8, 3, padding=1, formula='convws'), SyncSwitchableNorm(8, unbiased_instance_var=True),
        nn.Conv2d(8, 8, 1), BatchChannelNorm(8, num_groups=4), nn.ReLU(),
        nn.Conv2d(8, 8, 1), BatchChannelNorm(8, num_groups=2, estimate=True),
        nn.Conv2d(8, 8, 1), SwitchableNorm(8, normalizers=('in', 'ln'), tied=True))
    # Trained-looking statistics and ratios: a few training steps.
    model.train()
    for layer in model.modules():
        if isinstance(layer, BatchChannelNorm) and layer.estimate:
            layer.set_update_rate(0.5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                for logits in module._mixture_logits().values():
                    logits.normal_()
        for _ in range(3):
            model(torch.randn(4, 3, 12, 12))
    return model.eval()


def test_model_with_sn_bcn_and_wsconv_exports_and_onnxruntime_matches(tmp_path):
    model = _model()
    x = torch.randn(2, 3, 12, 12)
    path = export_onnx(model, (x,), str(tmp_path / 'model.onnx'))
    assert onnx_max_difference(model, path, (x,)) < 1e-5
    # Another input of the same shape: the graph holds the layers, not the traced values.
    assert onnx_max_difference(model, path, (torch.randn(2, 3, 12, 12) * 3 + 1,)) < 1e-4


def test_dynamic_batch_and_deployed_model_export(tmp_path):
    model = _model()
    for module in model.modules():
        if isinstance(module, SwitchableNorm):
            module.harden()
    deployed = copy.deepcopy(model)
    deploy_model(deployed)
    x = torch.randn(2, 3, 12, 12)
    path = export_onnx(deployed, (x,), str(tmp_path / 'deployed.onnx'), dynamic_batch=True)
    assert onnx_max_difference(deployed, path, (torch.randn(5, 3, 12, 12),)) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)
