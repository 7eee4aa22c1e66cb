"""Carry the global torch random state through checkpoints, so a resumed run continues exactly.

mmengine re-seeds on resume and replays the data loader up to the resumed iteration, which puts the
data pipeline (numpy/python ``random`` in the loader) back where it was. The model's own random
draws (proposal sampling, dropout) come from torch's global generator, which the replay does not
touch: without this hook they restart from the seed and a resumed run drifts from an uninterrupted
one.
"""
from typing import Optional

import torch
from mmengine.hooks import Hook

CHECKPOINT_KEY = 'torch_rng_state'


class TorchRNGStateHook(Hook):
    """Save torch's CPU and CUDA generator states with each checkpoint and restore them on resume.

    The states are restored just before the first resumed training iteration, after mmengine has
    replayed the data loader, so the model sees the generator exactly as at the moment of saving.
    A checkpoint loaded with ``load_from`` (fine-tuning, the runner starts at iteration 0) leaves the
    random state alone.
    """
    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = {'cpu': torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint[CHECKPOINT_KEY] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if CHECKPOINT_KEY in checkpoint:
            # meta['iter'] is the iteration a resumed runner starts from.
            self._pending = dict(state=checkpoint[CHECKPOINT_KEY], iter=checkpoint['meta'].get('iter'))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if runner.iter != pending['iter']:
            return  # loaded for fine-tuning, not resumed
        torch.set_rng_state(pending['state']['cpu'])
        if 'cuda' in pending['state'] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(pending['state']['cuda'])
