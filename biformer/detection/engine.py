"""Training losses and COCO evaluation (pycocotools mAP) for the detectors in :mod:`.models`."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .data import CocoDetection
from .._extras import require

__all__ = ["to_coco_results", "evaluate_coco", "draw_detections", "COCO_METRICS"]

# the order of COCOeval.stats
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(
    output: Dict[str, Tensor], image_id: int, category_ids: Sequence[int], mask_threshold: float = 0.5
) -> List[Dict[str, Any]]:
    """One image's detections as COCO result records (xywh boxes, category ids, RLE masks)."""
    boxes = output["boxes"].detach().cpu()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    scores = output["scores"].tolist()
    cats = [category_ids[int(label) - 1] for label in output["labels"]]
    records = [
        {"image_id": image_id, "category_id": c, "bbox": [round(float(v), 2) for v in b], "score": s}
        for b, c, s in zip(boxes, cats, scores)
    ]
    if "masks" in output:
        require("pycocotools", extra="dense")  # one clear error when the extra is absent
        from pycocotools import mask as mask_utils

        binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # (N, H, W)
        for record, m in zip(records, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            record["segmentation"] = rle
    return records


def _summarise(coco_gt: Any, results: List[Dict[str, Any]], iou_type: str) -> Tuple[Dict[str, float], str]:
    require("pycocotools", extra="dense")  # one clear error when the extra is absent
    from pycocotools.cocoeval import COCOeval

    if not results:  # pycocotools cannot load an empty result list
        return {k: 0.0 for k in COCO_METRICS}, f"no detections: {iou_type} AP is 0\n"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep that as NaN-free 0 for logs
    stats = {k: max(float(v), 0.0) for k, v in zip(COCO_METRICS, evaluator.stats)}
    return stats, out.getvalue()


@torch.no_grad()
def evaluate_coco(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    batch_size: int = 1,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    runtime: Optional[Any] = None,
) -> Dict[str, float]:
    """Run the model over ``dataset`` and score it with pycocotools.

    Returns ``{"bbox_AP": ..., "bbox_AP50": ..., ..., "segm_AP": ...}`` as fractions in [0, 1]
    (``segm_*`` only for models that predict masks). Under torchrun (``runtime`` distributed) each
    rank runs its shard of the images; rank 0 scores all results and every rank gets the figures.
    """
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    from .data import collate

    model.eval()
    world, rank = (runtime.world_size, runtime.rank) if runtime is not None else (1, 0)
    shard = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
    loader: Iterable = DataLoader(shard, batch_size=batch_size, shuffle=False, collate_fn=collate)
    results: List[Dict[str, Any]] = []
    has_masks = False
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        for output, target in zip(outputs, targets):
            has_masks = has_masks or "masks" in output
            results += to_coco_results(output, int(target["image_id"]), dataset.category_ids)
    if world > 1:
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, (results, has_masks))
        results = [r for part, _ in gathered for r in part]
        has_masks = any(m for _, m in gathered)
        if rank != 0:  # rank 0 scores; the others receive its figures
            box: List[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    metrics: Dict[str, float] = {}
    for iou_type in ("bbox", "segm") if has_masks else ("bbox",):
        stats, text = _summarise(dataset.coco, results, iou_type)
        if verbose:
            log(text.rstrip())
        metrics.update({f"{iou_type}_{k}": v for k, v in stats.items()})
    if world > 1:
        dist.broadcast_object_list([metrics], src=0)
    return metrics


def draw_detections(
    image: Tensor,
    output: Dict[str, Tensor],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> Tensor:
    """Boxes, labels with scores and (Mask R-CNN) masks over ``image`` ((3, H, W) float [0, 1] or uint8).

    Returns a ``(3, H, W)`` uint8 tensor. Label ``i`` is named ``class_names[i - 1]``.
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ..viz.colors import class_colors, label_font_path

    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    keep = output["scores"] >= score_threshold
    boxes, labels, scores = output["boxes"][keep].cpu(), output["labels"][keep].cpu(), output["scores"][keep].cpu()
    if len(boxes) == 0:
        return image
    palette = class_colors(max(len(class_names), int(labels.max())))
    colors = [palette[int(label) - 1] for label in labels]
    if "masks" in output:
        masks = output["masks"][keep][:, 0].cpu() > mask_threshold  # (N, H, W)
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=colors)
    names = [class_names[int(i) - 1] if int(i) - 1 < len(class_names) else f"class {int(i)}" for i in labels]
    text = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
    size = max(11, min(image.shape[1:]) // 40)
    return draw_bounding_boxes(
        image, boxes, text, colors=colors, width=max(2, size // 5), font=label_font_path(), font_size=size,
        label_colors="white", fill_labels=True,
    )
