"""Batch-average statistics: python tools/precise_stats.py CONFIG CHECKPOINT --num-batches K [--out FILE]
[--mode loss|tensor] [--cfg-options K=V ...] [--launcher none|pytorch|slurm|mpi].

Recomputes the SN/SyncSN and large-batch BCN layers that ``model.train()`` puts in training mode;
frozen stages and ``norm_eval`` layers keep their statistics."""
from norm_plugins.analysis.cli import precise_stats_main
from norm_plugins.runner.entrypoints import run_tool

if __name__ == '__main__':
    run_tool(precise_stats_main)
