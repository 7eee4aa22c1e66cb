from .mixture_clip import MixtureClipAmpOptimWrapper, MixtureClipOptimWrapper
from .norm_aware_constructor import MIXTURE_LOGITS, PLUGIN_NORMS, NormAwareOptimWrapperConstructor

__all__ = ['MIXTURE_LOGITS', 'MixtureClipAmpOptimWrapper', 'MixtureClipOptimWrapper', 'PLUGIN_NORMS',
           'NormAwareOptimWrapperConstructor']
