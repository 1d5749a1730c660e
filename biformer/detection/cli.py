"""``biformer detect``: train, evaluate and run BiFormer detectors on COCO-format data.

    biformer detect demo-data DIR                     # a small synthetic COCO-format set of shapes
    biformer detect train --images DIR --annotations FILE --output RUN [--val-images DIR --val-annotations FILE]
    biformer detect eval --checkpoint RUN/last.safetensors --images DIR --annotations FILE
    biformer detect predict IMAGE --checkpoint RUN/last.safetensors   # IMAGE: a file or astronaut/coffee/chelsea/...

Training defaults are the paper's COCO 1x recipe: 12 epochs, AdamW lr 1e-4 (weight decay 0.05 for
Mask R-CNN, 1e-4 for RetinaNet; none on norms and biases), linear warmup over 500 steps, lr x0.1
after epochs 8 and 11, drop path 0.2, n_win 16, 800x1333 inputs, random horizontal flip. The paper
used 16 images per step (8 GPUs x 2); ``--batch-size`` is per step here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import UserFileNotFoundError, UserValueError
from ..engine.optim import LRSchedule, build_optimizer
from ..engine.runtime import resolve_device
from ..engine.steploop import TrainLoop, logged_evaluation
from ..images import SAMPLE_IMAGES, load_image
from ..resources import check_arguments, check_aspect, check_memory, json_argument
from .data import CocoDetection, _read_coco_json, collate
from .engine import COCO_METRICS, detection_losses, draw_detections, evaluate_coco
from .models import BUILDERS, load_detector, save_detector

WEIGHT_DECAY = {"mask_rcnn": 0.05, "retinanet": 1e-4}  # the paper's configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    demo = sub.add_parser("demo-data", help="write a small synthetic COCO-format dataset of shapes")
    demo.add_argument("root", help="output folder (train/, val/, annotations/)")
    demo.add_argument("--num-train", type=int, default=64)
    demo.add_argument("--num-val", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train", help="train a detector on COCO-format data",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--images", required=True, help="training images folder")
    train.add_argument("--annotations", required=True, help="training instances JSON (COCO format)")
    train.add_argument("--val-images", help="validation images folder (evaluated after every epoch)")
    train.add_argument("--val-annotations", help="validation instances JSON")
    train.add_argument("--output", required=True, help="run folder: last.safetensors, last.train.pt, metrics.jsonl")
    train.add_argument("--model", choices=sorted(BUILDERS), default="mask_rcnn")
    train.add_argument("--backbone", default="biformer_small", help="biformer_tiny/small/base/stl")
    train.add_argument("--backbone-kwargs", default=None, help='extra BiFormer kwargs as JSON, e.g. \'{"depths": [1,1,2,1]}\'')
    train.add_argument("--model-kwargs", default=None,
                       help='extra builder kwargs as JSON, e.g. \'{"fpn_channels": 128, "box_batch_size_per_image": 128}\'')
    train.add_argument("--pretrained-backbone", default=None, help="ImageNet classification checkpoint (ours or original)")
    train.add_argument("--n-win", type=int, default=16, help="regions per side of the routed attention")
    train.add_argument("--drop-path", type=float, default=0.2, help="stochastic depth of the backbone")
    train.add_argument("--min-size", type=int, default=800, help="short side the model resizes images to")
    train.add_argument("--max-size", type=int, default=1333, help="cap on the long side")
    train.add_argument("--epochs", type=int, default=12, help="passes over the training images (1x schedule)")
    train.add_argument("--steps", type=int, default=None, help="total steps instead of --epochs (milestones scale with it)")
    train.add_argument("--milestones", type=float, nargs="*", default=[8, 11], help="epochs after which lr x0.1")
    train.add_argument("--batch-size", type=int, default=2, help="images per step (the paper: 16 over 8 GPUs)")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    train.add_argument("--weight-decay", type=float, default=None, help="none given: 0.05 (mask_rcnn), 1e-4 (retinanet)")
    train.add_argument("--warmup-steps", type=int, default=500, help="linear warmup from 0.001x")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    _add_runtime(train)
    train.add_argument("--log-every", type=int, default=20)

    ev = sub.add_parser("eval", help="COCO mAP of a trained detector")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--images", required=True)
    ev.add_argument("--annotations", required=True)
    ev.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    ev.add_argument("--verbose", action="store_true", help="print pycocotools' full summary")
    _add_runtime(ev)

    pr = sub.add_parser("predict", help="draw detections on an image to a PNG")
    pr.add_argument("image", help=f"image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)}")
    pr.add_argument("--checkpoint", default=None, help="trained detector; without it an untrained model is used")
    pr.add_argument("--model", choices=sorted(BUILDERS), default="mask_rcnn", help="untrained model (no --checkpoint)")
    pr.add_argument("--backbone", default="biformer_small", help="untrained model's backbone (no --checkpoint)")
    pr.add_argument("--output", default=None, help="PNG path (default: IMAGE_detections.png here)")
    pr.add_argument("--score-threshold", type=float, default=0.5,
                    help="draw detections scoring at least this (also lowers the model's own 0.05 cut-off)")
    pr.add_argument("--max-detections", type=int, default=100, help="keep at most this many per image")
    pr.add_argument("--max-memory-gb", type=float, default=None,
                    help="refuse inputs estimated to need more memory than this (default: half the RAM)")
    pr.add_argument("--device", default="auto")


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--seed", type=int, default=0)


def _format(metrics: Dict[str, float]) -> str:
    lines = []
    for kind in ("bbox", "segm"):
        if f"{kind}_AP" in metrics:
            lines.append(f"{kind}: " + "  ".join(f"{k} {100 * metrics[f'{kind}_{k}']:.1f}" for k in COCO_METRICS))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    check_arguments(args, positive=("n_win", "epochs", "steps", "batch_size", "lr", "log_every"),
                    non_negative=("drop_path", "weight_decay", "warmup_steps", "workers", "milestones"),
                    at_least_32=("min_size", "max_size"))
    backbone_kwargs = json_argument(args.backbone_kwargs, "--backbone-kwargs")
    model_kwargs = json_argument(args.model_kwargs, "--model-kwargs")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    out = Path(args.output)
    last, state = out / "last.safetensors", out / "last.train.pt"
    if args.resume:
        if not last.is_file():
            raise UserFileNotFoundError(f"--resume: no checkpoint at {str(last)!r}")
        model, info = load_detector(last)
        builder = info["builder"]
    else:
        builder = args.model
    masks = builder == "mask_rcnn"
    train_set = CocoDetection(args.images, args.annotations, train=True, masks=masks)
    val_set = None
    if args.val_images or args.val_annotations:
        if not (args.val_images and args.val_annotations):
            raise UserValueError("give both --val-images and --val-annotations, or neither")
        val_set = CocoDetection(args.val_images, args.val_annotations, masks=masks)
    if not args.resume:
        model = BUILDERS[builder](
            backbone=args.backbone,
            num_classes=len(train_set.class_names),
            pretrained_backbone=args.pretrained_backbone,
            n_win=args.n_win,
            drop_path_rate=args.drop_path,
            min_size=args.min_size,
            max_size=args.max_size,
            backbone_kwargs=backbone_kwargs or None,
            **model_kwargs,
        )
    model.to(device)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=collate, persistent_workers=args.workers > 0)
    total = args.steps or args.epochs * len(loader)
    per_epoch = total / args.epochs
    schedule = LRSchedule("step", total, warmup_steps=min(args.warmup_steps, total // 4), warmup_ratio=1e-3,
                          milestones=tuple(round(m * per_epoch) for m in args.milestones))
    weight_decay = WEIGHT_DECAY[builder] if args.weight_decay is None else args.weight_decay
    optimizer = build_optimizer(model, args.lr, weight_decay)
    names = train_set.class_names
    out.mkdir(parents=True, exist_ok=True)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{builder} with {args.backbone if not args.resume else info['kwargs'].get('backbone')} ({params:.1f}M params), "
          f"{len(train_set)} training images, {len(names)} classes, {total} steps on {device}")
    loop = TrainLoop(
        model, optimizer, schedule, detection_losses(model, device),
        state_path=state,
        save=lambda step: save_detector(last, model, names),
        evaluate=(logged_evaluation(lambda: evaluate_coco(model, val_set, device), out, lambda m: "\n" + _format(m))
                  if val_set is not None else None),
        log_every=args.log_every,
        save_every=max(1, round(per_epoch)),
        eval_every=max(1, round(per_epoch)),
    )
    loop.run_from(loader, resume=bool(args.resume))
    print(f"saved {last}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    check_arguments(args, non_negative=("workers",))
    _read_coco_json(args.annotations)  # a broken annotation file is named before the checkpoint loads
    device = resolve_device(args.device)
    model, info = load_detector(args.checkpoint)
    dataset = CocoDetection(args.images, args.annotations, masks=info["builder"] == "mask_rcnn")
    if dataset.class_names != info["class_names"]:
        raise UserValueError(f"the annotations' classes {dataset.class_names[:5]}... differ from the checkpoint's "
                         f"{info['class_names'][:5]}...")
    metrics = evaluate_coco(model.to(device), dataset, device, verbose=args.verbose)
    print(f"{info['builder']} on {len(dataset)} images:\n{_format(metrics)}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


@torch.no_grad()
def _predict(args: argparse.Namespace) -> int:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    _set_output_limits(None, args.score_threshold, args.max_detections)  # check the numbers before any work
    check_arguments(args, positive=("max_memory_gb",))
    device = resolve_device(args.device)
    pil = load_image(args.image)
    check_aspect(pil.width, pil.height)
    if args.checkpoint:
        model, info = load_detector(args.checkpoint)
        names = info["class_names"]
    else:
        print(f"warning: no --checkpoint, so this {args.model} ({args.backbone}) is untrained and its detections "
              "are meaningless; train one with `biformer detect train`")
        model = BUILDERS[args.model](backbone=args.backbone, num_classes=80)
        names = [f"class {i}" for i in range(1, 81)]
    _set_output_limits(model, args.score_threshold, args.max_detections)
    check_memory(model, *_resized(model, pil.height, pil.width), args.max_memory_gb)
    model.to(device).eval()
    image = pil_to_tensor(pil)  # (3, H, W) uint8
    output = model([image.float().div(255).to(device)])[0]
    drawn = draw_detections(image, output, names, score_threshold=args.score_threshold)
    path = Path(args.output or f"{Path(str(args.image)).stem}_detections.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)
    keep = output["scores"] >= args.score_threshold
    print(f"{int(keep.sum())} detections with score >= {args.score_threshold}; wrote {path} "
          f"({drawn.shape[2]}x{drawn.shape[1]})")
    if not keep.any():
        best = f"{output['scores'].max().item():.3f}" if len(output["scores"]) else "none"
        print(f"  (best score: {best}; lower --score-threshold to see more)")
    for box, label, score in zip(output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                 output["scores"][keep].tolist()):
        name = names[label - 1] if label - 1 < len(names) else f"class {label}"
        print(f"  {name:<16} {score:.2f}  [{', '.join(f'{v:.0f}' for v in box)}]")
    return 0


def _resized(model: torch.nn.Module, height: int, width: int) -> Tuple[int, int]:
    """The size torchvision's transform resizes an image to: short side to min_size, long side at most max_size."""
    transform = model.transform
    scale = min(max(transform.min_size) / min(height, width), transform.max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _set_output_limits(model: Optional[torch.nn.Module], score_threshold: float, max_detections: int) -> None:
    """Make the detector itself keep what predict is asked to draw (torchvision cuts at 0.05 and 100);
    with ``model=None``, only check the values."""
    if not 0 <= score_threshold <= 1:
        raise UserValueError(f"got --score-threshold {score_threshold}, expected a score in [0, 1]")
    if max_detections < 1:
        raise UserValueError(f"got --max-detections {max_detections}, expected at least 1")
    if model is None:
        return
    # Mask R-CNN keeps its limits in roi_heads; RetinaNet on the model itself
    holder = getattr(model, "roi_heads", model)
    holder.score_thresh = min(holder.score_thresh, score_threshold)
    holder.detections_per_img = max_detections


def _demo_data(args: argparse.Namespace) -> int:
    check_arguments(args, positive=("num_train", "num_val"))
    from .synthetic import write_coco_shapes

    paths = write_coco_shapes(args.root, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    print("wrote " + ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"train": _train, "eval": _eval, "predict": _predict, "demo-data": _demo_data}
    return actions[args.action](args)
