"""The embedded demo: a synthetic "shapes" dataset that detectors and segmenters learn in minutes."""
from .shapes import CLASSES, generate_shapes_dataset, shapes_dataset_ready

__all__ = ['CLASSES', 'generate_shapes_dataset', 'shapes_dataset_ready']
