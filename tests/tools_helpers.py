"""Shared pieces of the tools tests: a tiny shapes dataset, --cfg-options that shrink the demo
configs to a few iterations, and running the scripts as a user would (fresh processes)."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / 'configs' / 'demo'
MASK_RCNN = DEMO / 'mask-rcnn_r18-sn_fpn_1xb8-600i_shapes-128.py'
FASTER_RCNN = DEMO / 'faster-rcnn_r18-syncsn_fpn_2xb4-600i_shapes-128.py'
DEEPLAB = DEMO / 'deeplabv3_r18-sn-d8_1xb8-300i_shapes-128.py'
PSPNET = DEMO / 'pspnet_r18-bcn-ws-d8_1xb8-300i_shapes-128.py'
DETECTION_CONFIGS = (MASK_RCNN, FASTER_RCNN)
TOOL_TIMEOUT = 300


def make_tiny_shapes(root: Path) -> Path:
    from norm_plugins.demo.shapes import generate_shapes_dataset
    generate_shapes_dataset(str(root), num_train=16, num_val=4, image_size=96, seed=3)
    return root


def tiny_options(config: Path, data_root: Path, max_iters: int = 4, checkpoint_interval: int = 2,
                 batch_size: int = 2, deterministic: bool = False) -> List[str]:
    """--cfg-options for a few iterations on ``data_root``, without validation during training."""
    root = f'{data_root}/'
    options = [f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters + 1}',
               f'train_dataloader.batch_size={batch_size}', 'val_dataloader.batch_size=2',
               'test_dataloader.batch_size=2',
               'default_hooks.logger.interval=1', f'default_hooks.checkpoint.interval={checkpoint_interval}',
               'default_hooks.checkpoint.max_keep_ckpts=-1',
               'randomness.seed=0', f'randomness.deterministic={deterministic}']
    for phase in ('train', 'val', 'test'):
        options += [f'{phase}_dataloader.dataset.data_root={root}', f'{phase}_dataloader.num_workers=0',
                    f'{phase}_dataloader.persistent_workers=False']
        if config in DETECTION_CONFIGS and phase != 'train':
            options.append(f'{phase}_evaluator.ann_file={root}annotations/instances_val.json')
    return options


def tool_env(extra_pythonpath: Optional[Path] = None, cpu_fusion: bool = False) -> Dict[str, str]:
    """The environment of a tool's child process. Without ``cpu_fusion`` it takes the ATen-op CPU route:
    inductor's compile of the fused loops costs 20-30 s in each new process, more than the few
    iterations these runs make. The fused loops are tested in process (test_rowwise, test_compile and
    every config's train step in test_configs) and in one recipe's full training run."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONHASHSEED='0')
    if not cpu_fusion:
        env['NORM_PLUGINS_CPU_FUSION'] = 'off'
    paths = [str(REPO)] + ([str(extra_pythonpath)] if extra_pythonpath else [])
    env['PYTHONPATH'] = os.pathsep.join(paths + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    return env


def run_tool(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``args`` (a script under tools/ and its arguments) and return the finished process."""
    command = [sys.executable] + args if args[0].endswith('.py') else ['bash'] + args
    result = subprocess.run(command, cwd=cwd, env=env or tool_env(), capture_output=True, text=True,
                            timeout=TOOL_TIMEOUT)
    if check and result.returncode != 0:
        raise AssertionError(f'{" ".join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n'
                             f'{result.stderr[-4000:]}')
    return result


