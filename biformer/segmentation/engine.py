"""Training losses, mIoU evaluation and colour overlays for :mod:`.models`.

Metrics follow mmsegmentation: a confusion matrix over all labelled pixels of the split (255 =
ignored), per-class IoU = intersection / union, mIoU = mean over classes that occur in the labels
or the predictions (others are NaN and skipped), aAcc = pixel accuracy, mAcc = mean per-class
accuracy over classes present in the labels.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserValueError
from .models import IGNORE_INDEX

__all__ = ["confusion_matrix", "metrics_from_confusion", "evaluate_miou", "overlay"]


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` int64 counts, rows = label, columns = prediction; ignored pixels left out."""
    valid = label != IGNORE_INDEX
    if (label[valid] >= num_classes).any() or (label[valid] < 0).any():
        bad = label[valid][(label[valid] >= num_classes) | (label[valid] < 0)][0].item()
        raise UserValueError(f"got label {bad} but the model has {num_classes} classes (0..{num_classes - 1}, 255 ignored); "
                         "check --reduce-zero-label / --num-classes")
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def metrics_from_confusion(confusion: Tensor, class_names: Sequence[str] = ()) -> Dict[str, Any]:
    """``mIoU``, ``mAcc``, ``aAcc`` (fractions) and per-class ``IoU`` (NaN where a class never occurs)."""
    conf = confusion.double()
    intersection = conf.diag()
    label_area, pred_area = conf.sum(1), conf.sum(0)
    union = label_area + pred_area - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
    acc = torch.where(label_area > 0, intersection / label_area.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
    names = list(class_names) or [str(i) for i in range(len(iou))]
    return {
        "mIoU": float(np.nanmean(iou.numpy())) if not torch.isnan(iou).all() else 0.0,
        "mAcc": float(np.nanmean(acc.numpy())) if not torch.isnan(acc).all() else 0.0,
        "aAcc": float(intersection.sum() / conf.sum().clamp(min=1)),
        "IoU": {n: float(v) for n, v in zip(names, iou.tolist())},
    }


@torch.no_grad()
def evaluate_miou(
    model: nn.Module,
    dataset: Any,
    num_classes: int,
    device: torch.device,
    class_names: Sequence[str] = (),
    runtime: Optional[Any] = None,
) -> Dict[str, Any]:
    """Whole-image inference over ``dataset`` (items: resized image, original-size label); see module doc.

    Under torchrun (``runtime`` distributed) each rank runs its shard; the confusion matrices are summed."""
    from torch.utils.data import DataLoader, Subset

    from ..engine.runtime import all_reduce_sum
    from .data import collate_eval

    model.eval()
    world, rank = (runtime.world_size, runtime.rank) if runtime is not None else (1, 0)
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for image, label in DataLoader(shard, batch_size=1, shuffle=False, collate_fn=collate_eval):
        logits = model(image.to(device))  # (1, K, h, w) at the resized image's size
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1).cpu(), label, num_classes)
    if world > 1:
        confusion = all_reduce_sum(confusion.to(runtime.device), runtime).cpu()  # type: ignore[union-attr]
    return metrics_from_confusion(confusion, class_names)


def overlay(
    image: Tensor, prediction: Tensor, class_names: Sequence[str], alpha: float = 0.5, legend: int = 8
) -> "Image.Image":  # noqa: F821  (PIL, imported lazily)
    """The image with each pixel tinted by its predicted class, and a legend of the largest classes.

    ``image``: (3, H, W) uint8; ``prediction``: (H, W) class indices. Returns a PIL image.
    """
    from PIL import Image, ImageDraw, ImageFont

    from ..viz.colors import class_colors, label_font_path

    palette = torch.tensor(class_colors(len(class_names)), dtype=torch.float32)  # (K, 3)
    colour = palette[prediction.long()].permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    blended = (image.float() * (1 - alpha) + colour * alpha).round().clamp(0, 255).to(torch.uint8)
    picture = Image.fromarray(blended.permute(1, 2, 0).numpy())
    counts = torch.bincount(prediction.flatten().long(), minlength=len(class_names))
    shown: List[int] = [int(i) for i in counts.argsort(descending=True)[:legend] if counts[i] > 0]
    size = max(12, min(picture.size) // 30)
    font = ImageFont.truetype(label_font_path(), size)
    draw = ImageDraw.Draw(picture)
    y = 4
    for i in shown:
        share = 100 * counts[i].item() / prediction.numel()
        text = f"{class_names[i]} {share:.0f}%"
        width = int(draw.textlength(text, font=font))
        draw.rectangle([4, y, 4 + size + 8 + width, y + size + 4], fill=(0, 0, 0))
        draw.rectangle([6, y + 2, 6 + size, y + 2 + size], fill=tuple(int(c) for c in palette[i]))
        draw.text((10 + size, y + 1), text, fill=(255, 255, 255), font=font)
        y += size + 6
    return picture
