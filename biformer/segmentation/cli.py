"""``biformer segment``: train, evaluate and run BiFormer segmentors on ADE20K-style folders.

    biformer segment demo-data DIR                  # a small synthetic ADE20K-style folder of shapes
    biformer segment train --data ROOT --output RUN [--model upernet|semantic_fpn]
    biformer segment eval --checkpoint RUN/last.safetensors --data ROOT
    biformer segment predict IMAGE --checkpoint RUN/last.safetensors   # IMAGE: a file or astronaut/coffee/...

Training defaults are the paper's ADE20K recipes (512x512 crops, n_win 8):

* UperNet: AdamW lr 6e-5, weight decay 0.01, linear warmup 1500 steps, poly decay (power 1) over
  160k steps, batch 16, drop path 0.3, auxiliary FCN head (weight 0.4).
* Semantic FPN: AdamW lr 2e-4, weight decay 1e-4, linear warmup 1000 steps from 0.1x, cosine decay
  over 80k steps, batch 32, drop path 0.15.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F

from ..errors import UserFileNotFoundError, UserValueError
from ..engine.optim import LRSchedule, build_optimizer
from ..engine.runtime import resolve_device
from ..engine.steploop import TrainLoop, logged_evaluation
from ..images import SAMPLE_IMAGES, load_image
from ..resources import check_arguments, check_aspect, check_memory, json_argument
from .data import SegmentationFolder, class_names_for, rescale_size
from .engine import evaluate_miou, overlay, segmentation_losses
from .models import BUILDERS, load_segmentor, save_segmentor

RECIPES: Dict[str, Dict[str, Any]] = {
    "upernet": dict(steps=160_000, batch_size=16, lr=6e-5, weight_decay=0.01, policy="poly", warmup_steps=1500,
                    warmup_ratio=1e-6, min_ratio=0.0, eval_every=16_000, drop_path=0.3),
    "semantic_fpn": dict(steps=80_000, batch_size=32, lr=2e-4, weight_decay=1e-4, policy="cosine", warmup_steps=1000,
                         warmup_ratio=0.1, min_ratio=1e-8, eval_every=8_000, drop_path=0.15),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    demo = sub.add_parser("demo-data", help="write a small synthetic ADE20K-style folder of shapes")
    demo.add_argument("root")
    demo.add_argument("--num-train", type=int, default=64)
    demo.add_argument("--num-val", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train", help="train a segmentor on an ADE20K-style folder",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--data", required=True, help="ROOT with images/ and annotations/ (training, validation)")
    train.add_argument("--output", required=True, help="run folder: last.safetensors, last.train.pt, metrics.jsonl")
    train.add_argument("--model", choices=sorted(BUILDERS), default="upernet")
    train.add_argument("--backbone", default="biformer_small", help="biformer_tiny/small/base/stl")
    train.add_argument("--backbone-kwargs", default=None, help='extra BiFormer kwargs as JSON, e.g. \'{"depths": [1,1,2,1]}\'')
    train.add_argument("--model-kwargs", default=None, help='extra builder kwargs as JSON, e.g. \'{"channels": 128}\'')
    train.add_argument("--pretrained-backbone", default=None, help="ImageNet classification checkpoint (ours or original)")
    train.add_argument("--n-win", type=int, default=8, help="regions per side of the routed attention")
    train.add_argument("--drop-path", type=float, default=None, help="default: 0.3 (upernet), 0.15 (semantic_fpn)")
    _add_data_args(train)
    train.add_argument("--crop-size", type=int, default=512, help="square training crops")
    train.add_argument("--steps", type=int, default=None, help="default: 160000 (upernet), 80000 (semantic_fpn)")
    train.add_argument("--batch-size", type=int, default=None, help="default: 16 (upernet), 32 (semantic_fpn)")
    train.add_argument("--lr", type=float, default=None, help="default: 6e-5 (upernet), 2e-4 (semantic_fpn)")
    train.add_argument("--weight-decay", type=float, default=None, help="default: 0.01 (upernet), 1e-4 (semantic_fpn)")
    train.add_argument("--warmup-steps", type=int, default=None, help="default: 1500 (upernet), 1000 (semantic_fpn)")
    train.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default 16000 / 8000)")
    train.add_argument("--save-every", type=int, default=2000, help="write last.safetensors every N steps")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    _add_runtime(train)
    train.add_argument("--log-every", type=int, default=50)

    ev = sub.add_parser("eval", help="mIoU of a trained segmentor")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", default="validation")
    ev.add_argument("--json", default=None, help="also write the metrics (with per-class IoU) to this JSON file")
    _add_data_args(ev)
    _add_runtime(ev)

    pr = sub.add_parser("predict", help="save a colour overlay of the predicted classes")
    pr.add_argument("image", help=f"image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)}")
    pr.add_argument("--checkpoint", default=None, help="trained segmentor; without it an untrained model is used")
    pr.add_argument("--model", choices=sorted(BUILDERS), default="upernet", help="untrained model (no --checkpoint)")
    pr.add_argument("--backbone", default="biformer_small", help="untrained model's backbone (no --checkpoint)")
    pr.add_argument("--output", default=None, help="PNG path (default: IMAGE_segmentation.png here)")
    pr.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                    help="inference size: the image is rescaled to fit, aspect kept")
    pr.add_argument("--max-memory-gb", type=float, default=None,
                    help="refuse inputs estimated to need more memory than this (default: half the RAM)")
    pr.add_argument("--device", default="auto")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=None,
                        help="default: the lines of ROOT/classes.txt, else 150 (ADE20K)")
    parser.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false",
                        help="take labels as 0..K-1 (255 ignored) rather than ADE20K's 0 = unlabelled, "
                        "1..K = classes (reduce_zero_label=%(default)s unless given)")
    parser.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                        help="base rescale size (training samples 0.5-2x of it; evaluation uses it as is)")


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--seed", type=int, default=0)


def _format(metrics: Dict[str, Any]) -> str:
    return "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc"))


def _num_classes(args: argparse.Namespace) -> int:
    if args.num_classes is not None:
        return args.num_classes
    return len(class_names_for(args.data))


def _train(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    check_arguments(args, positive=("n_win", "steps", "batch_size", "lr", "eval_every", "save_every", "log_every",
                                    "num_classes"),
                    non_negative=("drop_path", "weight_decay", "warmup_steps", "workers"),
                    at_least_32=("crop_size", "scale"))
    backbone_kwargs = json_argument(args.backbone_kwargs, "--backbone-kwargs")
    model_kwargs = json_argument(args.model_kwargs, "--model-kwargs")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    out = Path(args.output)
    last, state = out / "last.safetensors", out / "last.train.pt"
    if args.resume:
        if not last.is_file():
            raise UserFileNotFoundError(f"--resume: no checkpoint at {str(last)!r}")
        model, info = load_segmentor(last)
        builder, names = info["builder"], info["class_names"]
    else:
        builder = args.model
        names = class_names_for(args.data, _num_classes(args))
    recipe = {k: v for k, v in RECIPES[builder].items()}
    recipe.update({k: getattr(args, k) for k in recipe if getattr(args, k, None) is not None})
    scale = tuple(args.scale)
    train_set = SegmentationFolder(args.data, "training", train=True, reduce_zero_label=args.reduce_zero_label,
                                   crop_size=args.crop_size, scale=scale)
    val_dir = Path(args.data) / "images" / "validation"
    val_set = SegmentationFolder(args.data, "validation", reduce_zero_label=args.reduce_zero_label, scale=scale) \
        if val_dir.is_dir() else None
    if not args.resume:
        model = BUILDERS[builder](
            backbone=args.backbone,
            num_classes=len(names),
            pretrained_backbone=args.pretrained_backbone,
            n_win=args.n_win,
            drop_path_rate=recipe["drop_path"],
            backbone_kwargs=backbone_kwargs or None,
            **model_kwargs,
        )
    model.to(device)
    loader = DataLoader(train_set, batch_size=recipe["batch_size"], shuffle=True, num_workers=args.workers,
                        drop_last=len(train_set) >= recipe["batch_size"], persistent_workers=args.workers > 0)
    total = recipe["steps"]
    schedule = LRSchedule(recipe["policy"], total, warmup_steps=min(recipe["warmup_steps"], total // 4),
                          warmup_ratio=recipe["warmup_ratio"], min_ratio=recipe["min_ratio"])
    optimizer = build_optimizer(model, recipe["lr"], recipe["weight_decay"])
    out.mkdir(parents=True, exist_ok=True)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{builder} ({params:.1f}M params), {len(train_set)} training images, {len(names)} classes, "
          f"{total} steps of {recipe['batch_size']} on {device}")
    loop = TrainLoop(
        model, optimizer, schedule, segmentation_losses(model, device),
        state_path=state,
        save=lambda step: save_segmentor(last, model, names),
        evaluate=(logged_evaluation(lambda: evaluate_miou(model, val_set, len(names), device, names), out, _format)
                  if val_set is not None else None),
        log_every=args.log_every,
        save_every=args.save_every,
        eval_every=recipe["eval_every"],
    )
    loop.run_from(loader, resume=bool(args.resume))
    print(f"saved {last}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    check_arguments(args, positive=("num_classes",), non_negative=("workers",), at_least_32=("scale",))
    device = resolve_device(args.device)
    model, info = load_segmentor(args.checkpoint)
    names = info["class_names"]
    if args.num_classes is not None and args.num_classes != len(names):
        raise UserValueError(f"got --num-classes {args.num_classes}, but the checkpoint has {len(names)} classes")
    dataset = SegmentationFolder(args.data, args.split, reduce_zero_label=args.reduce_zero_label, scale=tuple(args.scale))
    metrics = evaluate_miou(model.to(device), dataset, len(names), device, names)
    print(f"{info['builder']} on {len(dataset)} {args.split} images: {_format(metrics)}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


@torch.no_grad()
def _predict(args: argparse.Namespace) -> int:
    from torchvision.transforms.functional import pil_to_tensor

    check_arguments(args, at_least_32=("scale",), positive=("max_memory_gb",))
    device = resolve_device(args.device)
    pil = load_image(args.image)
    check_aspect(pil.width, pil.height)
    image = pil_to_tensor(pil)  # (3, H, W) uint8
    if args.checkpoint:
        model, info = load_segmentor(args.checkpoint)
        names = info["class_names"]
    else:
        print(f"warning: no --checkpoint, so this {args.model} ({args.backbone}) is untrained and its classes are "
              "meaningless; train one with `biformer segment train`")
        model = BUILDERS[args.model](backbone=args.backbone, num_classes=150)
        names = class_names_for(None, 150)
    height, width = image.shape[1:]
    size = rescale_size(height, width, tuple(args.scale))
    check_memory(model, *size, args.max_memory_gb)
    model.to(device).eval()
    x = F.interpolate(image[None].float().div(255), size=size, mode="bilinear", align_corners=False)
    logits = model(x.to(device))  # (1, K, h, w)
    prediction = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0).cpu()
    path = Path(args.output or f"{Path(str(args.image)).stem}_segmentation.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, prediction, names).save(path)
    counts = torch.bincount(prediction.flatten(), minlength=len(names))
    top = [(names[i], 100 * counts[i].item() / prediction.numel()) for i in counts.argsort(descending=True)[:5] if counts[i]]
    print(f"wrote {path}; largest classes: " + ", ".join(f"{n} {p:.0f}%" for n, p in top))
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    check_arguments(args, positive=("num_train", "num_val"))
    from .synthetic import write_ade_shapes

    root = write_ade_shapes(args.root, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    print(f"wrote {root}/images, {root}/annotations (training, validation) and {root}/classes.txt")
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"train": _train, "eval": _eval, "predict": _predict, "demo-data": _demo_data}
    return actions[args.action](args)
