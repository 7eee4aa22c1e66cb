"""The study's three presets: ``default`` (2 CPU cores, at most about 20 minutes on an idle machine),
``cuda`` (a larger study for one GPU) and ``tiny`` (seconds, for tests)."""
import os.path as osp
from typing import Dict

from .classification import ClassificationSetting
from .detection import DetectionSetting
from .normalizers import DETECTION_NORMALIZERS, NORMALIZERS

#: Shapes dataset of the demo (tools/make_shapes_dataset.py defaults).
DEMO_SHAPES = dict(num_train=600, num_val=100, image_size=128, seed=0)
TINY_SHAPES = dict(num_train=4, num_val=2, image_size=64, seed=0)


def preset(name: str, out_dir: str, data_root: str = 'data/shapes') -> Dict:
    """``dict(classification=..., detection=..., shapes=...)`` for preset ``name``.

    ``shapes`` holds the generation settings of the detection data, generated under ``data_root``
    (the tiny preset uses its own small dataset inside ``out_dir``) when it is not there yet.
    """
    if name == 'default':
        return dict(
            classification=ClassificationSetting(
                normalizers=NORMALIZERS, images_per_process=(1, 2, 8, 32), seeds=(0, 1, 2), images=3072),
            detection=DetectionSetting(normalizers=DETECTION_NORMALIZERS, seeds=(0, 1), iters=300,
                                       data_root=data_root),
            shapes=DEMO_SHAPES)
    if name == 'cuda':
        return dict(
            classification=ClassificationSetting(
                normalizers=NORMALIZERS, images_per_process=(1, 2, 4, 8, 16, 32), seeds=(0, 1, 2, 3, 4),
                images=12800, image_size=32, widths=(32, 64, 128), device='cuda'),
            detection=DetectionSetting(normalizers=('BN', 'GN', 'GN+WS', 'SN', 'BCN+WS'), seeds=(0, 1, 2),
                                       iters=3000, data_root=data_root, device='cuda'),
            shapes=DEMO_SHAPES)
    if name == 'tiny':
        return dict(
            classification=ClassificationSetting(
                normalizers=NORMALIZERS, images_per_process=(1, 2), seeds=(0,), images=8, image_size=8,
                widths=(8, 16), num_groups=4),
            detection=DetectionSetting(normalizers=('BN', 'SN', 'SSN'), seeds=(0,), iters=2,
                                       data_root=osp.join(out_dir, 'shapes_tiny')),
            shapes=TINY_SHAPES)
    raise ValueError(f'unknown preset {name!r}; choose default, cuda or tiny')
