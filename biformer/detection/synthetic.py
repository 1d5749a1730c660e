"""Small synthetic datasets of coloured shapes, to try the commands and test them without downloads.

``write_coco_shapes(root)`` writes a COCO-format detection set (``biformer detect demo-data``);
:mod:`biformer.segmentation.synthetic` writes the same scenes as an ADE20K-style folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
from .._extras import require

PathLike = Union[str, os.PathLike]

__all__ = ["SHAPE_CLASSES", "synthetic_scene", "write_coco_shapes"]

SHAPE_CLASSES = ("circle", "square", "triangle")


def synthetic_scene(
    rng: np.random.Generator, height: int, width: int, max_objects: int = 3
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """A ``(H, W, 3)`` uint8 image of 1..max_objects shapes on a textured background.

    Returns the image and ``(class_index, mask)`` per visible object (class_index into
    :data:`SHAPE_CLASSES`, mask ``(H, W)`` bool); later shapes occlude earlier ones.
    """
    require("skimage", extra="dense")  # one clear error when the extra is absent
    from skimage.draw import disk, polygon

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 160, size=3)
    tilt = rng.uniform(-60, 60, size=(2, 3))
    image = base + ys[..., None] / height * tilt[0] + xs[..., None] / width * tilt[1]
    image += rng.normal(0, 12, size=(height, width, 3))
    objects: List[Tuple[int, np.ndarray]] = []
    side = min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        r = rng.uniform(0.12, 0.25) * side
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        mask = np.zeros((height, width), dtype=bool)
        if cls == 0:
            mask[disk((cy, cx), r, shape=mask.shape)] = True
        elif cls == 1:
            mask[int(cy - r):int(cy + r), int(cx - r):int(cx + r)] = True
        else:
            rows = [cy - r, cy + r, cy + r]
            cols = [cx, cx - r * 1.1, cx + r * 1.1]
            mask[polygon(rows, cols, shape=mask.shape)] = True
        for _, earlier in objects:
            earlier &= ~mask
        objects.append((cls, mask))
        image[mask] = rng.uniform(0, 255, size=3)
    objects = [(c, m) for c, m in objects if m.sum() >= 16]
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _sizes(rng: np.random.Generator, size_range: Tuple[int, int]) -> Tuple[int, int]:
    lo, hi = size_range
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def write_coco_shapes(
    root: PathLike,
    num_train: int = 64,
    num_val: int = 16,
    size_range: Tuple[int, int] = (96, 160),
    seed: int = 0,
) -> Dict[str, Path]:
    """Write ``root/{train,val}/*.png`` and ``root/annotations/instances_{train,val}.json``.

    Image sides are drawn from ``size_range`` (odd sizes included). Returns the four paths.
    """
    from PIL import Image
    require("pycocotools", extra="dense")  # one clear error when the extra is absent
    from pycocotools import mask as mask_utils

    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    paths: Dict[str, Path] = {}
    ann_id = 1
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            height, width = _sizes(rng, size_range)
            image, objects = synthetic_scene(rng, height, width)
            name = f"{image_id:06d}.png"
            Image.fromarray(image).save(root / split / name)
            images.append({"id": image_id, "file_name": name, "height": height, "width": width})
            for cls, mask in objects:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                rle["counts"] = rle["counts"].decode("ascii")
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": cls + 1, "segmentation": rle,
                    "area": float(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0,
                })
                ann_id += 1
        ann_file = root / "annotations" / f"instances_{split}.json"
        ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        paths[f"{split}_images"] = root / split
        paths[f"{split}_annotations"] = ann_file
    return paths
