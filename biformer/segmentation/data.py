"""ADE20K-style segmentation folders and the paper's (mmsegmentation's) ADE20K pipelines.

Layout (as ``ADEChallengeData2016``)::

    ROOT/images/training/*.jpg        ROOT/annotations/training/*.png   (same stem)
    ROOT/images/validation/*.jpg      ROOT/annotations/validation/*.png
    ROOT/classes.txt                  optional: one class name per line

Label PNGs hold one class index per pixel. With ``reduce_zero_label`` (ADE20K's convention, the
default) 0 means "unlabelled" and becomes 255 (ignored), and classes 1..150 become 0..149. Without
it, labels are used as they are and 255 is still ignored.

Training (``train=True``): random rescale by 0.5-2.0 of a 2048x512 scale (aspect kept), random
512x512 crop in which no class covers more than 75% (10 tries), horizontal flip (p=0.5), colour
jitter, padding to the crop size (image: the ImageNet mean, which is 0 once normalised, as in mmseg;
label 255). Evaluation: the image is rescaled to the 2048x512 scale (aspect kept) and labels stay at
their original size, as mmsegmentation scores them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserFileNotFoundError, UserValueError
from .models import IGNORE_INDEX, IMAGENET_MEAN

PathLike = Union[str, os.PathLike]

__all__ = ["SegmentationFolder", "ADE20K_CLASSES", "class_names_for", "rescale_size"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# ADE20K (SceneParsing, 150 classes) in label order 1..150
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150


def class_names_for(root: Optional[PathLike], num_classes: Optional[int] = None) -> List[str]:
    """``ROOT/classes.txt`` if present; else ADE20K's names for 150 classes; else ``class i``."""
    if root is not None and (Path(root) / "classes.txt").is_file():
        names = [line.strip() for line in (Path(root) / "classes.txt").read_text().splitlines() if line.strip()]
        if num_classes is not None and len(names) != num_classes:
            raise UserValueError(f"{Path(root) / 'classes.txt'} names {len(names)} classes, expected {num_classes}")
        return names
    if num_classes is None or num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [f"class {i}" for i in range(num_classes)]


def rescale_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _pairs(root: Path, split: str) -> List[Tuple[Path, Path]]:
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise UserFileNotFoundError(f"no folder {str(d)!r}; expected ROOT/images/{split} and ROOT/annotations/{split}")
    pairs, missing = [], []
    for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label = label_dir / f"{image.stem}.png"
        (pairs if label.is_file() else missing).append((image, label))
    if missing:
        raise UserFileNotFoundError(f"{len(missing)} images have no label PNG, e.g. {str(missing[0][1])!r}")
    if not pairs:
        raise UserFileNotFoundError(f"no images in {str(image_dir)!r}")
    return pairs


class SegmentationFolder(Dataset):
    """``(image (3, H, W) float [0, 1], label (H, W) int64)`` pairs from an ADE20K-style folder (see module doc)."""

    def __init__(
        self,
        root: PathLike,
        split: str = "training",
        *,
        train: bool = False,
        reduce_zero_label: bool = True,
        crop_size: int = 512,
        scale: Tuple[int, int] = (2048, 512),
        ratio_range: Tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
    ) -> None:
        self.root = Path(root)
        self.pairs = _pairs(self.root, split)
        self.train = train
        self.reduce_zero_label = reduce_zero_label
        self.crop_size = crop_size
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        if train:
            from torchvision.transforms import ColorJitter

            # mmseg's PhotoMetricDistortion: brightness +-32/255, contrast and saturation 0.5-1.5, hue +-18 degrees
            self.jitter = ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Tuple[Tensor, Tensor]:
        """The image and its label as stored (label already reduced when ``reduce_zero_label``)."""
        from PIL import Image

        image_path, label_path = self.pairs[index]
        from ..images import open_rgb

        image = torch.from_numpy(np.asarray(open_rgb(image_path)).copy()).permute(2, 0, 1).float().div_(255)
        try:
            with Image.open(label_path) as im:
                label = torch.from_numpy(np.asarray(im).astype(np.int64))  # indices: never rescaled
        except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's errors for damaged files
            raise UserValueError(f"cannot read label PNG {str(label_path)!r}: {type(e).__name__}: {e}") from None
        if label.dim() != 2:
            raise UserValueError(f"{str(label_path)!r} has shape {tuple(label.shape)}; expected a single-channel label PNG")
        if label.shape != image.shape[1:]:
            raise UserValueError(f"{str(label_path)!r} is {tuple(label.shape)} but its image is {tuple(image.shape[1:])}")
        if self.reduce_zero_label:
            label = torch.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)
        return image, label

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        image, label = self.load(index)
        if not self.train:
            size = rescale_size(*image.shape[1:], self.scale)
            return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0], label
        return self._augment(image, label)

    def _augment(self, image: Tensor, label: Tensor) -> Tuple[Tensor, Tensor]:
        lo, hi = self.ratio_range
        ratio = lo + float(torch.rand(())) * (hi - lo)
        size = rescale_size(*image.shape[1:], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        image, label = self._random_crop(image, label)
        if torch.rand(()) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        image = self.jitter(image)
        pad_h, pad_w = self.crop_size - image.shape[1], self.crop_size - image.shape[2]
        if pad_h > 0 or pad_w > 0:
            # mmseg pads after normalising, with 0; the model normalises later, so pad with the mean
            canvas = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1).repeat(
                1, image.shape[1] + max(pad_h, 0), image.shape[2] + max(pad_w, 0))
            canvas[:, : image.shape[1], : image.shape[2]] = image
            image = canvas
            label = F.pad(label, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=IGNORE_INDEX)
        return image, label

    def _random_crop(self, image: Tensor, label: Tensor) -> Tuple[Tensor, Tensor]:
        height, width = label.shape
        ch, cw = min(self.crop_size, height), min(self.crop_size, width)
        for _ in range(10):
            top = int(torch.randint(height - ch + 1, ()))
            left = int(torch.randint(width - cw + 1, ()))
            crop = label[top:top + ch, left:left + cw]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


def collate_eval(batch: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """Evaluation runs one image at a time (sizes differ): a batch of one."""
    if len(batch) != 1:
        raise ValueError(f"evaluation batches hold one image, got {len(batch)}")
    image, label = batch[0]
    return image[None], label[None]
