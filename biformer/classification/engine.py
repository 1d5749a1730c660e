"""Evaluation of a classifier, for one process or many (sharded, then reduced), and the
preprocessing a model is trained and evaluated with. Training runs on the shared engine: see
:mod:`.training` (the task) and :mod:`biformer.engine.loop` (the loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._extras import require
from ..engine.logs import show_progress
from ..engine.loop import log
from ..engine.runtime import Runtime, all_reduce_sum, autocast
from ..errors import UserValueError
from .config import TrainConfig


# ---- evaluation --------------------------------------------------------------------------------


@dataclass
class EvalResult:
    num_images: int
    loss: float
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    per_class_correct: List[int]
    per_class_total: List[int]
    num_skipped: int = 0
    num_nonfinite: int = 0  # images whose logits hold NaN or inf; then loss and accuracies are NaN

    def per_class_accuracy(self) -> List[Optional[float]]:
        return [100.0 * c / t if t else None for c, t in zip(self.per_class_correct, self.per_class_total)]

    def to_dict(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        names = list(class_names) if class_names else [str(i) for i in range(len(self.per_class_total))]
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "num_images": self.num_images,
            "num_skipped": self.num_skipped,
            "num_nonfinite": self.num_nonfinite,
            "per_class": {
                name: {"top1": acc, "num_images": total}
                for name, acc, total in zip(names, self.per_class_accuracy(), self.per_class_total)
            },
        }


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, num_classes: int, runtime: Runtime,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             progress: bool = False, desc: str = "eval") -> EvalResult:
    """Top-1/top-5, mean cross-entropy and per-class accuracy; sums are reduced over ranks, and each
    rank holds a disjoint shard without padding, so the numbers equal a single process's.

    Images whose logits are not finite are counted (``num_nonfinite``); with any of them, loss and
    accuracies are NaN, since a ranking of NaN logits means nothing."""
    require("tqdm", extra="train")  # one clear error when the extra is absent
    from tqdm import tqdm

    model.eval()
    device = runtime.device
    k = min(5, num_classes)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1 hits, top-k hits, skipped, non-finite
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # hits, totals
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress(progress, runtime.is_main), dynamic_ncols=True)
    for batch in bar:
        for name in batch.skipped:
            log(f"warning: skipped unreadable image {name}")
        sums[3] += len(batch.skipped)
        if batch.images.numel() == 0:
            continue
        images = batch.images.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if int(targets.max()) >= num_classes:
            raise UserValueError(f"the data has label {int(targets.max())} but the model has only {num_classes} classes")
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()  # (B, classes)
        sums[4] += (~torch.isfinite(logits).all(dim=1)).sum()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        hits = logits.topk(k, dim=1).indices == targets[:, None]  # (B, k)
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        per_class[0] += torch.bincount(targets[hits[:, 0]], minlength=num_classes)
        per_class[1] += torch.bincount(targets, minlength=num_classes)
    all_reduce_sum(sums, runtime)
    all_reduce_sum(per_class, runtime)
    n = int(per_class[1].sum())
    if n == 0:
        raise UserValueError("no image could be evaluated")
    nonfinite = int(sums[4])
    nan = float("nan")
    return EvalResult(
        num_images=n,
        loss=float(sums[0]) / n if not nonfinite else nan,
        top1=100.0 * float(sums[1]) / n if not nonfinite else nan,
        top5=100.0 * float(sums[2]) / n if not nonfinite else nan,
        per_class_correct=[int(v) for v in per_class[0].tolist()],
        per_class_total=[int(v) for v in per_class[1].tolist()],
        num_skipped=int(sums[3]),
        num_nonfinite=nonfinite,
    )


# ---- model -------------------------------------------------------------------------------------


def data_config(cfg: TrainConfig, model: nn.Module) -> Dict[str, Any]:
    """Preprocessing: the config's values where set, else the model's defaults."""
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "input_size": (3, cfg.img_size, cfg.img_size),
        "interpolation": cfg.interpolation,
        "mean": tuple(cfg.mean or base.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.std or base.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": cfg.crop_pct if cfg.crop_pct is not None else base.get("crop_pct", 0.875),
    }


__all__ = ["EvalResult", "data_config", "evaluate"]
