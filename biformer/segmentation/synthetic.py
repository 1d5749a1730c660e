"""A small synthetic ADE20K-style folder of coloured shapes (``biformer segment demo-data``).

Labels follow ADE20K's convention: 0 = unlabelled (a thin frame round each image, ignored with
``reduce_zero_label``), 1 = background, 2.. = the shapes, so the classes are
``background, circle, square, triangle`` (written to ``classes.txt``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from ..detection.synthetic import SHAPE_CLASSES, synthetic_scene

PathLike = Union[str, os.PathLike]

__all__ = ["write_ade_shapes", "DEMO_CLASSES"]

DEMO_CLASSES = ("background",) + SHAPE_CLASSES


def write_ade_shapes(
    root: PathLike,
    num_train: int = 64,
    num_val: int = 16,
    size_range: Tuple[int, int] = (96, 160),
    seed: int = 0,
) -> Path:
    """Write ``root/images/{training,validation}/*.jpg``, ``root/annotations/...png`` and ``root/classes.txt``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            image, objects = synthetic_scene(rng, height, width)
            label = np.ones((height, width), dtype=np.uint8)
            for cls, mask in objects:
                label[mask] = cls + 2
            label[:2], label[-2:], label[:, :2], label[:, -2:] = 0, 0, 0, 0
            name = f"shapes_{split}_{i:06d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    (root / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")
    return root
