"""The batch-size study: the papers' micro-batch findings reproduced with the plug-in's layers
(``tools/study_batch_size.py``, ``docs/batch_size_study.md``)."""
from .classification import ClassificationSetting, run_classification
from .detection import DetectionSetting, run_detection
from .normalizers import NORMALIZERS, layer_cfgs
from .report import summarize, write_report
from .settings import preset

__all__ = ['ClassificationSetting', 'DetectionSetting', 'NORMALIZERS', 'layer_cfgs', 'preset', 'run_classification',
           'run_detection', 'summarize', 'write_report']
