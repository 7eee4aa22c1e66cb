"""Finetuning with hard SN ratios (the SN paper's sparse SN): harden every SN after the checkpoint
is loaded, before the first training iteration."""
from collections import Counter

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..layers.switchable_norm import NORMALIZERS, SwitchableNorm


class SNHardRatiosHook(Hook):
    """Before training (after ``load_from``/resume), fix every SN's ratios to their argmax with
    :meth:`SwitchableNorm.harden`; they stay one-hot and untrained for the rest of the run and in
    the checkpoints it saves. Use: ``custom_hooks = [dict(type='SNHardRatiosHook')]`` with
    ``load_from`` a model trained with soft ratios.

    Under DistributedDataParallel the logits stop being parameters after the wrapper was built, so
    the wrapper needs ``find_unused_parameters=True``; or build the layers hardened instead with
    ``norm_cfg=dict(type='SN', hard_ratios=True)``, which hardens the logits as they load.
    """
    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        model = runner.model
        if is_model_wrapper(model):
            if not getattr(model, 'find_unused_parameters', True):
                raise ValueError('SNHardRatiosHook: the model is wrapped in DistributedDataParallel without '
                                 'find_unused_parameters, which fails once the SN logits stop being trained; set '
                                 "find_unused_parameters = True in the config, or use norm_cfg=dict(type='SN', "
                                 'hard_ratios=True) instead of this hook.')
            model = model.module
        choices = Counter()
        for module in model.modules():
            if isinstance(module, SwitchableNorm):
                module.harden()
                # One (mean, var) choice per ratio vector pair: per channel group for group SN.
                mean, var = (ratios.reshape(-1, len(NORMALIZERS)).argmax(-1).tolist()
                             for ratios in module.mixture_ratios())
                choices.update(f'{NORMALIZERS[m].upper()}/{NORMALIZERS[v].upper()}' for m, v in zip(mean, var))
        if not choices:
            raise ValueError("SNHardRatiosHook: the model has no SN layer; remove the hook or use "
                             "norm_cfg=dict(type='SN')")
        runner.logger.info('SNHardRatiosHook: hard ratios (mean/var choice: layers, or channel groups of '
                           'group-SN layers) ' + ', '.join(f'{c}: {n}' for c, n in sorted(choices.items())))
