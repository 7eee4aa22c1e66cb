"""Evaluate a checkpoint: python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--metrics-json FILE]
[--cfg-options K=V ...] [--launcher none|pytorch|slurm|mpi]."""
from norm_plugins.runner.entrypoints import run_tool, test

if __name__ == '__main__':
    run_tool(test)
