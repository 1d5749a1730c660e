"""COCO-format detection data: an images folder plus an ``instances_*.json`` file.

Category ids in the file (any, e.g. COCO's 1..90 with gaps) become contiguous labels ``1..K`` in
sorted id order; :attr:`CocoDetection.category_ids` maps them back for evaluation.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserFileNotFoundError, UserValueError
from .._extras import require

PathLike = Union[str, os.PathLike]

__all__ = ["CocoDetection", "collate"]


def _read_coco_json(ann_file: PathLike) -> Dict[str, Any]:
    """The annotation file's dict, checked for the shape pycocotools assumes; UserErrors name the file."""
    path = str(ann_file)
    if not Path(ann_file).is_file():
        raise UserFileNotFoundError(f"no COCO annotation file at {path!r}")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserValueError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserValueError(f"{path!r} holds a JSON {type(data).__name__}; expected a COCO object with "
                             "'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise UserValueError(f"{path!r}: '{key}' is a {type(data[key]).__name__}, expected a list")
    if not data.get("categories"):
        raise UserValueError(f"{path!r} defines no categories; expected a non-empty 'categories' list")
    for what, required in (("images", ("id", "file_name")), ("annotations", ("id", "image_id", "category_id", "bbox")),
                           ("categories", ("id", "name"))):
        for record in data.get(what, []):
            missing = [k for k in required if not isinstance(record, dict) or k not in record]
            if missing:
                raise UserValueError(f"{path!r}: an entry of '{what}' lacks {missing}: {str(record)[:120]}")
    for ann in data.get("annotations", []):
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise UserValueError(f"{path!r}: annotation {ann['id']} has bbox {box!r}; expected [x, y, width, height]")
    return data


def _quiet_coco(ann_file: PathLike) -> Any:
    require("pycocotools", extra="dense")  # one clear error when the extra is absent
    from pycocotools.coco import COCO

    data = _read_coco_json(ann_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _check_boxes_inside(coco: Any, ann_file: PathLike) -> None:
    """Boxes that reach outside their image (by the JSON's width and height).

    Decision: a box partly outside is clipped to the image (as the original pipelines do; COCO
    itself has boxes a pixel outside), with one warning that counts them. A box with no area inside
    its image is a broken annotation and is refused, naming the file and the annotation id.
    """
    clipped, example = 0, None
    for ann in coco.anns.values():
        info = coco.imgs.get(ann["image_id"], {})
        width, height = info.get("width"), info.get("height")
        if not width or not height:
            continue
        x, y, w, h = ann["bbox"]
        if x >= 0 and y >= 0 and x + w <= width and y + h <= height:
            continue
        if min(x + w, width) - max(x, 0) <= 0 or min(y + h, height) - max(y, 0) <= 0:
            raise UserValueError(
                f"{str(ann_file)!r}: annotation {ann['id']} has bbox {ann['bbox']} (x, y, width, height), entirely "
                f"outside its {width}x{height} image {info.get('file_name')!r}; fix or remove it"
            )
        clipped += 1
        example = example or f"annotation {ann['id']}: bbox {ann['bbox']} in {width}x{height}"
    if clipped:
        warnings.warn(f"{str(ann_file)!r}: {clipped} boxes reach outside their image and are clipped to it "
                      f"(e.g. {example})", stacklevel=3)


class CocoDetection(Dataset):
    """Images and targets in torchvision's detection format.

    Each item is ``(image, target)``: ``image`` a float RGB tensor ``(3, H, W)`` in [0, 1]; ``target``
    has ``boxes`` (N, 4) x1y1x2y2 pixels, ``labels`` (N,) in 1..K, ``image_id`` and, with
    ``masks=True``, ``masks`` (N, H, W) uint8. Crowd regions are left out.

    Args:
        train: drop images without any usable object and flip horizontally at random (p=0.5).
    """

    def __init__(self, images_dir: PathLike, ann_file: PathLike, *, train: bool = False, masks: bool = False) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise UserFileNotFoundError(f"no images folder at {str(images_dir)!r}")
        self.coco = _quiet_coco(ann_file)
        if train:
            _check_boxes_inside(self.coco, ann_file)
        self.category_ids: List[int] = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise UserValueError(f"{str(ann_file)!r} defines no categories")
        self.class_names: List[str] = [self.coco.cats[c]["name"] for c in self.category_ids]
        self._label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if self._annotations(i)]
        if not ids:
            raise UserValueError(f"{str(ann_file)!r} has no {'annotated ' if train else ''}images")
        self.ids = ids
        self.train = train
        self.masks = masks

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, image_id: int) -> List[Dict[str, Any]]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in anns if a["bbox"][2] > 1 and a["bbox"][3] > 1 and a["category_id"] in self._label_of]

    def load_image(self, index: int) -> Tensor:
        from ..images import open_rgb

        info = self.coco.imgs[self.ids[index]]
        array = np.asarray(open_rgb(self.images_dir / info["file_name"]))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)  # (H, W, 3) -> (3, H, W)

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(index)
        _, height, width = image.shape
        anns = self._annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        # a box that clipping left without area (the image differs from the JSON's size) cannot train
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1) & ((boxes[:, 3] - boxes[:, 1]) > 1)
        if not keep.all():
            boxes, anns = boxes[keep], [a for a, k in zip(anns, keep.tolist()) if k]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id),
        }
        if self.masks:
            with warnings.catch_warnings():
                # pycocotools' decoder trips a NumPy 2 DeprecationWarning (``copy=False``) on every mask
                warnings.simplefilter("ignore", DeprecationWarning)
                masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(batch: List[Tuple[Tensor, Dict[str, Tensor]]]) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """Detection batches stay lists: images differ in size, and torchvision batches them itself."""
    images, targets = zip(*batch)
    return list(images), list(targets)
