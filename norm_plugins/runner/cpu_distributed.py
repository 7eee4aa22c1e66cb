"""Starting a multi-process run without GPUs: gloo instead of NCCL, no ``torch.cuda.set_device``.

mmengine's launchers (``pytorch``, ``slurm``, ``mpi``) always call ``torch.cuda.set_device`` and
default to NCCL, so on a CPU-only machine the tools initialize the process group themselves; the
Runner then finds it initialized and skips its own setup.
"""
import datetime
import logging
import os
import subprocess
from typing import Any, Dict, List, Tuple

import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import MODEL_WRAPPERS
from torch.nn.parallel import DistributedDataParallel

from .errors import ToolError

_HOW_TO_LAUNCH = {
    'pytorch': 'start it with tools/dist_train.sh CONFIG NUM_PROCESSES (torchrun sets RANK, WORLD_SIZE, '
               'LOCAL_RANK, MASTER_ADDR and MASTER_PORT)',
    'slurm': 'start it with tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR (srun sets SLURM_PROCID, '
             'SLURM_NTASKS and SLURM_NODELIST)',
    'mpi': 'start it with mpirun, which sets OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE, and export '
           'MASTER_ADDR (and MASTER_PORT, default 29500)',
}


def _require(env: Dict[str, str], names, launcher: str) -> None:
    missing = [n for n in names if n not in env]
    if missing:
        raise ToolError(f"--launcher {launcher} needs the environment variables {', '.join(missing)}; "
                        f'{_HOW_TO_LAUNCH[launcher]}')


def process_coordinates(launcher: str, env: Dict[str, str] = os.environ) -> Tuple[int, int, int, str, str]:
    """(rank, world_size, local_rank, master_addr, master_port) of this process under ``launcher``."""
    if launcher == 'pytorch':
        _require(env, ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'), launcher)
        return (int(env['RANK']), int(env['WORLD_SIZE']), int(env['LOCAL_RANK']), env['MASTER_ADDR'],
                env['MASTER_PORT'])
    if launcher == 'slurm':
        _require(env, ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'), launcher)
        addr = env.get('MASTER_ADDR') or subprocess.getoutput(
            f"scontrol show hostnames {env['SLURM_NODELIST']} | head -n1").strip()
        return (int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env.get('SLURM_LOCALID', 0)), addr,
                env.get('MASTER_PORT', '29500'))
    if launcher == 'mpi':
        _require(env, ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'MASTER_ADDR'), launcher)
        return (int(env['OMPI_COMM_WORLD_RANK']), int(env['OMPI_COMM_WORLD_SIZE']),
                int(env.get('OMPI_COMM_WORLD_LOCAL_RANK', 0)), env['MASTER_ADDR'], env.get('MASTER_PORT', '29500'))
    raise ToolError(f"unknown launcher {launcher!r}; use one of none, pytorch, slurm, mpi")


def init_cpu_process_group(launcher: str, cfg: Config) -> None:
    """Join a gloo process group for ``launcher`` and adapt ``cfg`` to CPU data parallelism.

    Exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (mmengine reads LOCAL_RANK), records the gloo
    backend in ``env_cfg.dist_cfg`` and asks for a DistributedDataParallel wrapper without
    ``device_ids`` (the only form DDP accepts for CPU modules). Buffers are not broadcast, so
    synchronized norm layers keep statistics through their own reductions, as on GPUs.
    """
    rank, world_size, local_rank, addr, port = process_coordinates(launcher)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=addr, MASTER_PORT=str(port))
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    timeout = datetime.timedelta(seconds=dist_cfg.get('timeout', 1800))
    if not dist.is_initialized():
        dist.init_process_group('gloo', init_method='env://', rank=rank, world_size=world_size, timeout=timeout)
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    if issubclass(MODEL_WRAPPERS.get(wrapper.get('type', 'MMDistributedDataParallel')), DistributedDataParallel):
        wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper
    replaced = replace_gpu_only_sync_bn(cfg.model)
    if replaced:
        print_log(f"PyTorch's SyncBN runs on GPUs only: on this CPU run {', '.join(replaced)} use BN, with "
                  'statistics of each process\'s own batch (the plug-in SyncSN and BCN still synchronize)',
                  logger='current', level=logging.WARNING)


GPU_ONLY_SYNC_BN = ('SyncBN', 'MMSyncBN')


def replace_gpu_only_sync_bn(node: Any, where: str = 'model') -> List[str]:
    """Turn every ``norm_cfg``-style ``type='SyncBN'``/``'MMSyncBN'`` under ``node`` into ``'BN'`` in
    place (mmengine reverts them itself only in non-distributed runs); returns where they were."""
    replaced: List[str] = []
    if isinstance(node, dict):
        if node.get('type') in GPU_ONLY_SYNC_BN:
            node['type'] = 'BN'
            replaced.append(where)
        for key, value in node.items():
            replaced += replace_gpu_only_sync_bn(value, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            replaced += replace_gpu_only_sync_bn(value, f'{where}.{index}')
    return replaced
