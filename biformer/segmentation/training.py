"""Segmentation as a task of the shared engine (:mod:`biformer.engine.loop`), on an ADE-layout root::

    ROOT/images/{training,validation}/*.jpg   ROOT/annotations/{training,validation}/*.png   [ROOT/classes.txt]

``biformer segment demo-data ROOT`` writes one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..engine.runtime import Runtime
from ..errors import UserValueError
from .data import SegmentationFolder, class_names_for
from .models import BUILDERS, save_segmentor

__all__ = ["SegmentationTask"]


class SegmentationTask:
    name = "segmentation"
    primary = "mIoU"
    resume_command = "biformer segment train --resume"

    def __init__(self, options: Dict[str, Any], backbone_kwargs: Dict[str, Any], model_kwargs: Dict[str, Any]) -> None:
        self.options = options
        if options["model"] == "upernet" and options["batch_size"] < 2:
            raise UserValueError(f"got --batch-size {options['batch_size']} for upernet, expected at least 2: its "
                                 "pyramid pooling normalises 1x1 maps with BatchNorm, which needs 2 images per process")
        self.class_names: List[str] = class_names_for(options["data"], options["num_classes"])
        scale = tuple(options["scale"])
        self.train_set = SegmentationFolder(options["data"], "training", train=True,
                                            reduce_zero_label=options["reduce_zero_label"],
                                            crop_size=options["crop_size"], scale=scale)  # type: ignore[arg-type]
        self.val_set: Optional[SegmentationFolder] = None
        if (Path(options["data"]) / "images" / "validation").is_dir():
            self.val_set = SegmentationFolder(options["data"], "validation", scale=scale,  # type: ignore[arg-type]
                                              reduce_zero_label=options["reduce_zero_label"])
        self.backbone_kwargs, self.model_kwargs = backbone_kwargs, model_kwargs

    def build_model(self) -> nn.Module:
        o = self.options
        return BUILDERS[o["model"]](
            backbone=o["backbone"], num_classes=len(self.class_names), pretrained_backbone=o["pretrained_backbone"],
            n_win=o["n_win"], drop_path_rate=o["drop_path"], backbone_kwargs=self.backbone_kwargs or None,
            **self.model_kwargs)

    def train_dataset(self) -> SegmentationFolder:
        return self.train_set

    def collate(self, items: List[Any]) -> Any:
        images, labels = zip(*items)
        return torch.stack(images), torch.stack(labels)  # (B, 3, crop, crop), (B, crop, crop)

    def losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, Tensor]:
        images, labels = batch
        return model(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))

    def evaluate(self, model: nn.Module, runtime: Runtime) -> Dict[str, float]:
        from .engine import evaluate_miou

        if self.val_set is None:
            return {}
        metrics = evaluate_miou(model, self.val_set, len(self.class_names), runtime.device, self.class_names,
                                runtime=runtime)
        return {k: v for k, v in metrics.items() if k != "IoU"}  # per-class IoU: `segment eval --json`

    def save(self, path: Path, model: nn.Module, extra: Dict[str, str]) -> None:
        save_segmentor(path, model, self.class_names, extra)

    def describe(self) -> str:
        o = self.options
        val = f"{len(self.val_set)} val images" if self.val_set is not None else "no val set"
        return f"{o['model']} with {o['backbone']}, {len(self.class_names)} classes, {val}"
