"""Detection as a task of the shared engine (:mod:`biformer.engine.loop`), on a COCO-layout root::

    ROOT/train/*.jpg|png   ROOT/val/...   ROOT/annotations/instances_train.json, instances_val.json

``biformer detect demo-data ROOT`` writes one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..engine.runtime import Runtime
from ..errors import UserFileNotFoundError
from .data import CocoDetection, collate
from .models import BUILDERS, save_detector

__all__ = ["DetectionTask", "coco_split"]


def coco_split(root: str, split: str) -> Tuple[Path, Path]:
    """``(images folder, instances JSON)`` of ``split`` under a COCO-layout ``root``."""
    images, annotations = Path(root) / split, Path(root) / "annotations" / f"instances_{split}.json"
    if not annotations.is_file():
        raise UserFileNotFoundError(
            f"no {split} annotations at {str(annotations)!r}; --data expects a COCO-layout root "
            f"(ROOT/{split}/, ROOT/annotations/instances_{split}.json), as `biformer detect demo-data ROOT` writes")
    return images, annotations


class DetectionTask:
    name = "detection"
    primary = "bbox_AP"
    resume_command = "biformer detect train --resume"
    find_unused_parameters = True  # heads without a target on a batch get no gradient

    def __init__(self, options: Dict[str, Any], backbone_kwargs: Dict[str, Any], model_kwargs: Dict[str, Any]) -> None:
        self.options = options
        self.masks = options["model"] == "mask_rcnn"
        images, annotations = coco_split(options["data"], "train")
        self.train_set = CocoDetection(images, annotations, train=True, masks=self.masks)
        self.class_names: List[str] = self.train_set.class_names
        self.val_set: Optional[CocoDetection] = None
        if (Path(options["data"]) / "annotations" / "instances_val.json").is_file():
            self.val_set = CocoDetection(*coco_split(options["data"], "val"), masks=self.masks)
        self.backbone_kwargs, self.model_kwargs = backbone_kwargs, model_kwargs

    def build_model(self) -> nn.Module:
        o = self.options
        return BUILDERS[o["model"]](
            backbone=o["backbone"], num_classes=len(self.class_names), pretrained_backbone=o["pretrained_backbone"],
            n_win=o["n_win"], drop_path_rate=o["drop_path"], min_size=o["min_size"], max_size=o["max_size"],
            backbone_kwargs=self.backbone_kwargs or None, **self.model_kwargs)

    def train_dataset(self) -> CocoDetection:
        return self.train_set

    def collate(self, items: List[Any]) -> Any:
        return collate(items)

    def losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, Tensor]:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return model(images, targets)

    def evaluate(self, model: nn.Module, runtime: Runtime) -> Dict[str, float]:
        from .engine import evaluate_coco

        if self.val_set is None:
            return {}
        return evaluate_coco(model, self.val_set, runtime.device, runtime=runtime)

    def save(self, path: Path, model: nn.Module, extra: Dict[str, str]) -> None:
        save_detector(path, model, self.class_names, extra)

    def describe(self) -> str:
        o = self.options
        val = f"{len(self.val_set)} val images" if self.val_set is not None else "no val set"
        return f"{o['model']} with {o['backbone']}, {len(self.class_names)} classes, {val}"
