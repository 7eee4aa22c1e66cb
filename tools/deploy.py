"""Inference-only model: python tools/deploy.py CONFIG CHECKPOINT [--out FILE] [--harden] [--input-size H W]
[--benchmark RUNS] [--onnx FILE] [--tolerance 1e-5] [--cfg-options K=V ...]."""
from norm_plugins.deploy.cli import main
from norm_plugins.runner.entrypoints import run_tool

if __name__ == '__main__':
    run_tool(main)
