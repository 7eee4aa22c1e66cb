"""Registration of norm_plugins components on mmengine's root registries.

mmcv's ``build_norm_layer``/``build_conv_layer`` and mmdet/mmseg's child registries all fall back to
the root ``MODELS``, so one registration serves every toolbox scope.
"""
from mmengine.registry import Registry


def register(registry: Registry, name: str, module: type) -> type:
    """Register ``module`` as ``name``; re-registering the same class (a module reload) is allowed.

    Raises:
        KeyError: if ``name`` already belongs to a different class, which would otherwise be
            silently shadowed.
    """
    existing = registry.module_dict.get(name)
    if existing is not None and _qualified(existing) != _qualified(module):
        raise KeyError(
            f"'{name}' is already registered in {registry.name} by {_qualified(existing)}; "
            f'norm_plugins cannot register {_qualified(module)} under the same name. '
            'Import norm_plugins before any package that registers this name, or rename one of them.')
    registry.register_module(name=name, module=module, force=True)
    return module


def _qualified(obj: type) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'
