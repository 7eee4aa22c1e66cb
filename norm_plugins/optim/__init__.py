from .norm_aware_constructor import MIXTURE_LOGITS, PLUGIN_NORMS, NormAwareOptimWrapperConstructor

__all__ = ['MIXTURE_LOGITS', 'PLUGIN_NORMS', 'NormAwareOptimWrapperConstructor']
