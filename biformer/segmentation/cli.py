"""``biformer segment``: train, evaluate and run BiFormer segmentors on ADE-layout folders.

    biformer segment demo-data ROOT                 # a small synthetic ADE-layout folder of shapes
    biformer segment train --data ROOT --output RUN [--model upernet|semantic_fpn]
    torchrun --nproc_per_node 8 -m biformer segment train --data ROOT --output RUN   # DDP
    biformer segment train --resume RUN             # continue a stopped run exactly
    biformer segment eval --checkpoint RUN/best.safetensors --data ROOT [--json]
    biformer segment predict IMAGE --checkpoint RUN/best.safetensors [--output PNG]

Training runs on the shared engine (:mod:`biformer.engine.loop`). Its defaults are the paper's
ADE20K recipes (512x512 crops, n_win 8), counted in epochs of ADE20K's 20,210 training images:

* UperNet: AdamW lr 6e-5, weight decay 0.01, linear warmup 1500 steps, poly decay (power 1) over
  127 epochs (the paper's 160k iterations of 16), batch 16, drop path 0.3, auxiliary FCN head (0.4).
* Semantic FPN: AdamW lr 2e-4, weight decay 1e-4, linear warmup 1000 steps from 0.1x, cosine decay
  over 127 epochs (80k iterations of 32), batch 32, drop path 0.15.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Tuple

from ..demo_data import add_demo_arguments
from ..engine.options import add_engine_arguments
from ..errors import UserValueError
from ..images import SAMPLE_IMAGES

# the segmentors of .models.BUILDERS, named here without importing them (a test checks they agree)
MODELS = ("semantic_fpn", "upernet")

RECIPES: Dict[str, Dict[str, Any]] = {
    # epochs: the paper's iterations x batch over ADE20K's 20,210 images; eval_every: its 16k / 8k iterations
    "upernet": dict(epochs=127, batch_size=16, lr=6e-5, weight_decay=0.01, policy="poly", warmup_steps=1500,
                    warmup_ratio=1e-6, min_ratio=0.0, eval_every=13, drop_path=0.3),
    "semantic_fpn": dict(epochs=127, batch_size=32, lr=2e-4, weight_decay=1e-4, policy="cosine", warmup_steps=1000,
                         warmup_ratio=0.1, min_ratio=1e-8, eval_every=13, drop_path=0.15),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train a segmentor on an ADE-layout root",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--data", help="ADE-layout ROOT: images/{training,validation}, annotations/{training,validation}")
    train.add_argument("--model", choices=MODELS, default="upernet")
    train.add_argument("--backbone", default="biformer_small", help="biformer_tiny/small/base/stl")
    train.add_argument("--backbone-kwargs", default=None, help='extra BiFormer kwargs as JSON, e.g. \'{"depths": [1,1,2,1]}\'')
    train.add_argument("--model-kwargs", default=None, help='extra builder kwargs as JSON, e.g. \'{"channels": 128}\'')
    train.add_argument("--pretrained-backbone", default=None, help="ImageNet classification checkpoint (ours or original)")
    train.add_argument("--n-win", type=int, default=8, help="regions per side of the routed attention")
    train.add_argument("--drop-path", type=float, default=None, help="default: 0.3 (upernet), 0.15 (semantic_fpn)")
    _add_data_args(train)
    train.add_argument("--crop-size", type=int, default=512, help="square training crops")
    add_engine_arguments(train, epochs=0, batch_size=0, lr=0.0, warmup_steps=0, log_every=50)
    # the model's recipe fills what is not given
    train.set_defaults(epochs=None, batch_size=None, lr=None, warmup_steps=None, eval_every=None)

    ev = sub.add_parser("eval", help="mIoU of a trained segmentor")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--split", default="validation")
    ev.add_argument("--json", action="store_true", help="print the metrics (with per-class IoU) as JSON")
    _add_data_args(ev)
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")

    pr = sub.add_parser("predict", help="save a colour overlay of the predicted classes")
    pr.add_argument("image", help=f"image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)}")
    pr.add_argument("--checkpoint", default=None, help="trained segmentor; without it an untrained model is used")
    pr.add_argument("--model", choices=MODELS, default="upernet", help="untrained model (no --checkpoint)")
    pr.add_argument("--backbone", default="biformer_small", help="untrained model's backbone (no --checkpoint)")
    pr.add_argument("--output", default=None, help="also save the colour overlay to this PNG")
    pr.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                    help="inference size: the image is rescaled to fit, aspect kept")
    pr.add_argument("--max-memory-gb", type=float, default=None,
                    help="refuse inputs estimated to need more memory than this (default: half the RAM)")
    pr.add_argument("--device", default="auto")

    demo = sub.add_parser("demo-data", help="write a small synthetic ADE20K-style folder of shapes")
    add_demo_arguments(demo, "images/, annotations/ (training, validation) and classes.txt", num_train=64,
                       num_val=16)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=None,
                        help="default: the lines of ROOT/classes.txt, else 150 (ADE20K)")
    parser.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false",
                        help="take labels as 0..K-1 (255 ignored) rather than ADE20K's 0 = unlabelled, "
                        "1..K = classes (reduce_zero_label=%(default)s unless given)")
    parser.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                        help="base rescale size (training samples 0.5-2x of it; evaluation uses it as is)")


def _format(metrics: Dict[str, Any]) -> str:
    return "  ".join(f"{k} {100 * metrics[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc"))


def _train(args: argparse.Namespace) -> int:
    from ..engine.loop import (ENGINE_NON_NEGATIVE, ENGINE_POSITIVE, engine_config, resolve_options,
                               run_config_text, run_task)
    from ..resources import check_arguments, json_argument
    from .training import SegmentationTask

    options, resume = resolve_options(args, "biformer segment train")
    if not options.get("data"):
        raise UserValueError("biformer segment train: give --data ROOT (an ADE-layout folder)")
    recipe = RECIPES[options["model"]]
    for key in ("epochs", "batch_size", "lr", "warmup_steps", "eval_every", "drop_path"):
        if options.get(key) is None:
            options[key] = recipe[key]
    check_arguments(argparse.Namespace(**options), positive=("n_win", "num_classes", *ENGINE_POSITIVE),
                    non_negative=("drop_path", *ENGINE_NON_NEGATIVE), at_least_32=("crop_size", "scale"))
    backbone_kwargs = json_argument(options["backbone_kwargs"], "--backbone-kwargs")
    model_kwargs = json_argument(options["model_kwargs"], "--model-kwargs")

    def setup(runtime: Any) -> Tuple[SegmentationTask, Any, str]:
        task = SegmentationTask(options, backbone_kwargs, model_kwargs)
        schedule = dict(policy=recipe["policy"], warmup_steps=options["warmup_steps"],
                        warmup_ratio=recipe["warmup_ratio"], min_ratio=recipe["min_ratio"])
        header = ["biformer segment train: this run's options. Continue it: biformer segment train --resume RUN"]
        return task, engine_config(options, recipe["weight_decay"], schedule), run_config_text(options, header)

    run_task(options["device"], setup, resume, args.overwrite)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..engine.runtime import init_runtime, shutdown
    from ..resources import check_arguments
    from .data import SegmentationFolder
    from .engine import evaluate_miou
    from .models import load_segmentor

    check_arguments(args, positive=("num_classes",), at_least_32=("scale",))
    runtime = init_runtime(args.device)
    try:
        model, info = load_segmentor(args.checkpoint)
        names = info["class_names"]
        if args.num_classes is not None and args.num_classes != len(names):
            raise UserValueError(f"got --num-classes {args.num_classes}, but the checkpoint has {len(names)} classes")
        dataset = SegmentationFolder(args.data, args.split, reduce_zero_label=args.reduce_zero_label,
                                     scale=tuple(args.scale))
        metrics = evaluate_miou(model.to(runtime.device), dataset, len(names), runtime.device, names, runtime=runtime)
    finally:
        shutdown(runtime)
    if runtime.is_main:
        if args.json:
            print(json.dumps({"model": info["builder"], "num_images": len(dataset), **metrics}, indent=2))
        else:
            print(f"{info['builder']} on {len(dataset)} {args.split} images: {_format(metrics)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import pil_to_tensor

    from ..engine.runtime import resolve_device
    from ..images import load_image
    from ..resources import check_arguments, check_aspect, check_memory
    from .data import class_names_for, rescale_size
    from .engine import overlay
    from .models import BUILDERS, load_segmentor

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
    with torch.no_grad():
        logits = model(x.to(device))  # (1, K, h, w)
    prediction = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0).cpu()
    wrote = ""
    if args.output:  # nothing is written unless asked
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        overlay(image, prediction, names).save(path)
        wrote = f"wrote {path}; "
    counts = torch.bincount(prediction.flatten(), minlength=len(names))
    top = [(names[i], 100 * counts[i].item() / prediction.numel()) for i in counts.argsort(descending=True)[:5] if counts[i]]
    print(f"{wrote}largest classes: " + ", ".join(f"{n} {p:.0f}%" for n, p in top))
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from ..demo_data import write_new_folder
    from ..resources import check_arguments
    from .synthetic import write_ade_shapes

    check_arguments(args, positive=("num_train", "num_val"))
    root = write_new_folder(args.root, lambda folder: write_ade_shapes(
        folder, num_train=args.num_train, num_val=args.num_val, seed=args.seed))
    print(f"wrote {args.num_train} training and {args.num_val} validation images with labels to {root}; "
          f"train on them: biformer segment train --data {root} --output RUN")
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"train": _train, "eval": _eval, "predict": _predict, "demo-data": _demo_data}
    return actions[args.action](args)
