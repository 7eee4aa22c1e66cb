"""Tiny datasets in the on-disk layouts the recipes read, for running them through their real pipelines.

- COCO 2017 (mmdet ``CocoDataset`` + ``CocoMetric``)::

      <root>/annotations/instances_{train,val}2017.json   polygons, all 80 categories with COCO's ids
      <root>/{train,val}2017/000000000001.jpg

- Cityscapes, both layouts at once (mmseg ``CityscapesDataset`` + ``IoUMetric``; mmdet
  ``CityscapesDataset`` + ``CocoMetric`` + ``CityScapesMetric``)::

      <root>/leftImg8bit/{train,val}/<city>/<city>_000000_NNNNNN_leftImg8bit.png
      <root>/gtFine/{train,val}/<city>/<city>_000000_NNNNNN_gtFine_{labelIds,labelTrainIds,instanceIds}.png
      <root>/annotations/instancesonly_filtered_gtFine_{train,val}.json

  The json is what mmdet's Cityscapes converter writes: built from the ``instanceIds`` png
  (id = labelId * 1000 + k), RLE masks, image ids from 0, ``segm_file`` naming the labelIds png.

- ADE20K (mmseg ``ADE20KDataset``, ``reduce_zero_label``)::

      <root>/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg
      <root>/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_NNNNNNNN.png

Every image is a noisy background with 1-4 non-overlapping shapes (the shapes demo's placement and
polygons); each shape is an object: the first of the dataset's first class, the others of random
classes. Deterministic in the seed.
"""
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw

from norm_plugins.demo.shapes import _place_shapes, _polygon_area, _shape_polygon

# COCO's 80 category ids (1-90 with gaps), in the order of mmdet's CocoDataset classes.
COCO_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
            32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
            58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
            88, 89, 90)
# Cityscapes instance classes (name, labelId, trainId), as in cityscapesscripts' labels table.
CITYSCAPES_THINGS = (('person', 24, 11), ('rider', 25, 12), ('car', 26, 13), ('truck', 27, 14), ('bus', 28, 15),
                     ('train', 31, 16), ('motorcycle', 32, 17), ('bicycle', 33, 18))
# Background: sky above the horizon, road below (labelId, trainId).
CITYSCAPES_SKY, CITYSCAPES_ROAD = (23, 10), (7, 0)
ADE20K_CLASSES = 150


def _scene(rng: np.random.Generator, width: int, height: int) -> Tuple[Image.Image, List[np.ndarray]]:
    """A noisy RGB background and 1-4 shape polygons inside it (at least 1/5 of the short side wide)."""
    side = min(width, height)
    noise = rng.normal(0, 12, size=(height, width, 3)) + rng.integers(0, 90, size=3)
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    offset = np.array([rng.uniform(0, width - side), rng.uniform(0, height - side)])
    polygons = [_shape_polygon(kind, cx, cy, radius, angle) + offset
                for kind, cx, cy, radius, angle in _place_shapes(rng, side, 0.2 * side, 0.35 * side)]
    draw = ImageDraw.Draw(image)
    for polygon in polygons:
        draw.polygon([tuple(p) for p in polygon.tolist()], fill=tuple(int(c) for c in rng.integers(120, 256, 3)))
    return image, polygons


def _class_index(rng: np.random.Generator, number: int, num_classes: int) -> int:
    """The first object of every image is of the first class (so a detector that favours it finds
    true positives), the others of any class."""
    return 0 if number == 0 else int(rng.integers(num_classes))


def _fill(size: Tuple[int, int], polygons: Sequence[np.ndarray], values: Sequence[int], background,
          mode: str = 'L') -> np.ndarray:
    label = Image.new(mode, size, 0)
    draw = ImageDraw.Draw(label)
    if callable(background):
        background(draw)
    for polygon, value in zip(polygons, values):
        draw.polygon([tuple(p) for p in polygon.tolist()], fill=int(value))
    return np.array(label)


def make_coco(root: Path, num_train: int = 4, num_val: int = 1, size: Tuple[int, int] = (96, 72),
              seed: int = 0) -> Path:
    """COCO 2017 layout under ``root`` (see the module docstring); returns ``root``."""
    from mmdet.datasets import CocoDataset
    classes = CocoDataset.METAINFO['classes']
    categories = [dict(id=i, name=name, supercategory='thing') for i, name in zip(COCO_IDS, classes)]
    width, height = size
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split, count in (('train', num_train), ('val', num_val)):
        rng = np.random.default_rng([seed, ['train', 'val'].index(split)])
        folder = root / f'{split}2017'
        folder.mkdir(exist_ok=True)
        coco: Dict = dict(info=dict(description='norm_plugins recipe test data'), licenses=[],
                          categories=categories, images=[], annotations=[])
        for index in range(count):
            image, polygons = _scene(rng, width, height)
            image_id = index + 1
            name = f'{image_id:012d}.jpg'
            image.save(folder / name, quality=95)
            coco['images'].append(dict(id=image_id, file_name=name, width=width, height=height))
            for number, polygon in enumerate(polygons):
                (x0, y0), (x1, y1) = polygon.min(axis=0), polygon.max(axis=0)
                coco['annotations'].append(dict(
                    id=len(coco['annotations']) + 1, image_id=image_id,
                    category_id=COCO_IDS[_class_index(rng, number, len(COCO_IDS))],
                    bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    area=round(_polygon_area(polygon), 2),
                    segmentation=[[round(float(v), 2) for v in polygon.reshape(-1)]], iscrowd=0))
        (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(coco))
    return root


def _cityscapes_instance_json(images: List[Tuple[str, np.ndarray]]) -> Dict:
    """mmdet's Cityscapes converter output for (``<city>/<name>_leftImg8bit.png``, instanceIds) pairs."""
    names = {label_id: name for name, label_id, _ in CITYSCAPES_THINGS}
    out: Dict = dict(images=[], annotations=[],
                     categories=[dict(id=label_id, name=name) for name, label_id, _ in CITYSCAPES_THINGS])
    for image_id, (file_name, instance_ids) in enumerate(images):
        out['images'].append(dict(
            id=image_id, file_name=file_name, height=instance_ids.shape[0], width=instance_ids.shape[1],
            segm_file=file_name.replace('leftImg8bit.png', 'gtFine_labelIds.png')))
        for value in np.unique(instance_ids[instance_ids >= 24]):
            label_id = int(value) // 1000 if value >= 1000 else int(value)
            if label_id not in names:
                continue
            rle = mask_utils.encode(np.asfortranarray((instance_ids == value)[:, :, None].astype(np.uint8)))[0]
            out['annotations'].append(dict(
                id=len(out['annotations']), image_id=image_id, category_id=label_id, iscrowd=int(value < 1000),
                bbox=mask_utils.toBbox(rle).tolist(), area=float(mask_utils.area(rle)),
                segmentation=dict(size=rle['size'], counts=rle['counts'].decode())))
    return out


def make_cityscapes(root: Path, num_train: int = 4, num_val: int = 1, size: Tuple[int, int] = (128, 64),
                    seed: int = 0) -> Path:
    """Cityscapes layout under ``root`` (see the module docstring); returns ``root``."""
    width, height = size
    horizon = height // 3

    def sky_and_road(value_index: int):
        def draw(canvas):
            canvas.rectangle([0, 0, width, horizon], fill=CITYSCAPES_SKY[value_index])
            canvas.rectangle([0, horizon, width, height], fill=CITYSCAPES_ROAD[value_index])
        return draw

    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split, count, city in (('train', num_train, 'aachen'), ('val', num_val, 'frankfurt')):
        rng = np.random.default_rng([seed, ['train', 'val'].index(split)])
        images, gt = root / 'leftImg8bit' / split / city, root / 'gtFine' / split / city
        images.mkdir(parents=True, exist_ok=True)
        gt.mkdir(parents=True, exist_ok=True)
        converted = []
        for index in range(count):
            image, polygons = _scene(rng, width, height)
            stem = f'{city}_000000_{index * 19 + 19:06d}'
            image.save(images / f'{stem}_leftImg8bit.png')
            things = [CITYSCAPES_THINGS[_class_index(rng, number, len(CITYSCAPES_THINGS))]
                      for number in range(len(polygons))]
            label_ids = _fill(size, polygons, [t[1] for t in things], sky_and_road(0))
            train_ids = _fill(size, polygons, [t[2] for t in things], sky_and_road(1))
            # instanceIds: labelId * 1000 + instance number for things, the labelId elsewhere (16-bit png).
            instance_ids = label_ids.astype(np.int32)
            for number, (polygon, thing) in enumerate(zip(polygons, things)):
                inside = _fill(size, [polygon], [1], None).astype(bool)
                instance_ids[inside] = thing[1] * 1000 + number
            Image.fromarray(label_ids).save(gt / f'{stem}_gtFine_labelIds.png')
            Image.fromarray(train_ids).save(gt / f'{stem}_gtFine_labelTrainIds.png')
            Image.fromarray(instance_ids.astype(np.uint16)).save(gt / f'{stem}_gtFine_instanceIds.png')
            converted.append((f'{city}/{stem}_leftImg8bit.png', instance_ids))
        (root / 'annotations' / f'instancesonly_filtered_gtFine_{split}.json').write_text(
            json.dumps(_cityscapes_instance_json(converted)))
    return root


def make_ade20k(root: Path, num_train: int = 2, num_val: int = 1, size: Tuple[int, int] = (96, 64),
                seed: int = 0) -> Path:
    """ADE20K layout: ``root/ADEChallengeData2016`` (see the module docstring); returns that folder."""
    data = root / 'ADEChallengeData2016'
    width, height = size
    for split, count, short in (('training', num_train, 'train'), ('validation', num_val, 'val')):
        rng = np.random.default_rng([seed, ['training', 'validation'].index(split)])
        images, annotations = data / 'images' / split, data / 'annotations' / split
        images.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, polygons = _scene(rng, width, height)
            stem = f'ADE_{short}_{index + 1:08d}'
            image.save(images / f'{stem}.jpg', quality=95)
            # 0 is ADE20K's "other" (ignored after reduce_zero_label), 1-150 the classes.
            background = int(rng.integers(1, ADE20K_CLASSES + 1))
            labels = rng.integers(1, ADE20K_CLASSES + 1, size=len(polygons))
            label = _fill(size, polygons, labels, lambda canvas: canvas.rectangle([0, 0, width, height],
                                                                                fill=background))
            label[:2] = 0
            Image.fromarray(label).save(annotations / f'{stem}.png')
    return data
