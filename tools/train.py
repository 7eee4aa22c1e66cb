"""Train an mmdet or mmsegmentation config: python tools/train.py CONFIG [--work-dir DIR] [--amp]
[--resume [CHECKPOINT]] [--cfg-options K=V ...] [--launcher none|pytorch|slurm|mpi]."""
from norm_plugins.runner.entrypoints import run_tool, train

if __name__ == '__main__':
    run_tool(train)
