"""A deterministic synthetic dataset of circles, squares and triangles.

Every image holds 1-4 non-overlapping shapes of random size, rotation and color on a noisy
background. The same polygons are written three ways, so detection and segmentation agree:

    <root>/img_dir/{train,val}/NNNNNN.png              RGB images
    <root>/ann_dir/{train,val}/NNNNNN.png              semantic maps: 0 background, 1 circle,
                                                       2 square, 3 triangle (mmseg custom layout)
    <root>/annotations/instances_{train,val}.json      COCO instances: boxes and polygon masks
    <root>/shapes_meta.json                            the generation settings, written last

Everything is a function of the seed, so a dataset is reproducible anywhere.
"""
import argparse
import json
import math
import os.path as osp
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle')
PALETTE = [(0, 0, 0), (220, 20, 60), (0, 128, 255), (255, 200, 0)]
META_FILE = 'shapes_meta.json'
# Bump when the drawing changes, so an old dataset on disk is regenerated.
FORMAT_VERSION = 1
CIRCLE_VERTICES = 40


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) of a shape with circumradius ``radius``, rotated by ``angle``."""
    sides = {'circle': CIRCLE_VERTICES, 'square': 4, 'triangle': 3}[kind]
    theta = angle + np.arange(sides) * 2 * math.pi / sides
    return np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _place_shapes(rng: np.random.Generator, image_size: int, min_radius: float,
                  max_radius: float) -> List[tuple]:
    """Non-overlapping (kind, cx, cy, radius, angle) tuples, fully inside the image."""
    shapes: List[tuple] = []
    wanted = int(rng.integers(1, 5))
    for _ in range(50 * wanted):
        if len(shapes) == wanted:
            break
        radius = float(rng.uniform(min_radius, max_radius))
        cx, cy = rng.uniform(radius + 1, image_size - radius - 1, size=2)
        if all(math.hypot(cx - x, cy - y) > radius + r + 2 for _, x, y, r, _ in shapes):
            kind = CLASSES[int(rng.integers(len(CLASSES)))]
            shapes.append((kind, float(cx), float(cy), radius, float(rng.uniform(0, 2 * math.pi))))
    return shapes


def _render(rng: np.random.Generator, image_size: int, shapes: Sequence[tuple]):
    background = rng.integers(0, 90, size=3)
    noise = rng.normal(0, 12, size=(image_size, image_size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    label = Image.new('L', (image_size, image_size), 0)
    draw, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
    polygons = []
    for kind, cx, cy, radius, angle in shapes:
        poly = _shape_polygon(kind, cx, cy, radius, angle)
        color = tuple(int(c) for c in rng.integers(120, 256, size=3))
        points = [tuple(p) for p in poly.tolist()]
        draw.polygon(points, fill=color)
        draw_label.polygon(points, fill=CLASSES.index(kind) + 1)
        polygons.append((kind, poly))
    return image, label, polygons


def _coco_skeleton() -> Dict:
    return dict(
        info=dict(description='norm_plugins synthetic shapes', version=str(FORMAT_VERSION)),
        licenses=[],
        categories=[dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)],
        images=[], annotations=[])


def _generate_split(root: Path, split: str, num_images: int, image_size: int, seed: int,
                    min_radius: float, max_radius: float) -> None:
    # One stream per split: the val set does not change when the train size does.
    rng = np.random.default_rng([seed, ['train', 'val'].index(split)])
    img_dir, ann_dir = root / 'img_dir' / split, root / 'ann_dir' / split
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    coco = _coco_skeleton()
    for index in range(num_images):
        image, label, polygons = _render(rng, image_size, _place_shapes(rng, image_size, min_radius, max_radius))
        name = f'{index:06d}.png'
        image.save(img_dir / name)
        label.save(ann_dir / name)
        image_id = index + 1
        coco['images'].append(dict(id=image_id, file_name=name, width=image_size, height=image_size))
        for kind, poly in polygons:
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            coco['annotations'].append(dict(
                id=len(coco['annotations']) + 1, image_id=image_id,
                category_id=CLASSES.index(kind) + 1,
                bbox=[round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                area=round(_polygon_area(poly), 2),
                segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]],
                iscrowd=0))
    (root / 'annotations').mkdir(exist_ok=True)
    with open(root / 'annotations' / f'instances_{split}.json', 'w') as f:
        json.dump(coco, f)


def _settings(num_train: int, num_val: int, image_size: int, seed: int) -> Dict:
    return dict(format_version=FORMAT_VERSION, num_train=num_train, num_val=num_val,
                image_size=image_size, seed=seed, classes=list(CLASSES))


def shapes_dataset_ready(root: str, num_train: int = 600, num_val: int = 100, image_size: int = 128,
                         seed: int = 0) -> bool:
    """Whether ``root`` holds a complete dataset generated with exactly these settings."""
    meta = osp.join(root, META_FILE)
    if not osp.isfile(meta):
        return False
    with open(meta) as f:
        return json.load(f) == _settings(num_train, num_val, image_size, seed)


def generate_shapes_dataset(root: str, num_train: int = 600, num_val: int = 100, image_size: int = 128,
                            seed: int = 0) -> str:
    """Write the dataset under ``root`` (see the module docstring) and return ``root``.

    Shapes have circumradius between 10% and 30% of the image side, so at 128 px they span about
    20-75 px: sizes a small FPN detector sees at strides 4-32.
    """
    if image_size < 32:
        raise ValueError(f'image_size must be at least 32 pixels for the shapes to fit, got {image_size}')
    if num_train < 1 or num_val < 1:
        raise ValueError(f'need at least one train and one val image, got num_train={num_train}, num_val={num_val}')
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)
    for split, count in (('train', num_train), ('val', num_val)):
        _generate_split(path, split, count, image_size, seed, 0.10 * image_size, 0.30 * image_size)
    with open(path / META_FILE, 'w') as f:
        json.dump(_settings(num_train, num_val, image_size, seed), f)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Generate the synthetic shapes dataset (COCO instances '
                                                 'and mmseg semantic maps) used by configs/demo.')
    parser.add_argument('--out', default='data/shapes', help='dataset root (default: data/shapes)')
    parser.add_argument('--num-train', type=int, default=600)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--image-size', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='regenerate even if an identical dataset exists')
    args = parser.parse_args(argv)
    settings = dict(num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed)
    if not args.force and shapes_dataset_ready(args.out, **settings):
        print(f'shapes dataset already present in {args.out}')
        return
    generate_shapes_dataset(args.out, **settings)
    print(f'shapes dataset written to {args.out}: {args.num_train} train / {args.num_val} val images')


if __name__ == '__main__':
    main()
