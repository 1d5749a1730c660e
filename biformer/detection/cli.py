"""``biformer detect``: train, evaluate and run BiFormer detectors on COCO-layout data.

    biformer detect demo-data ROOT                    # a small synthetic COCO-layout set of shapes
    biformer detect train --data ROOT --output RUN    # ROOT/{train,val}/, ROOT/annotations/instances_{train,val}.json
    torchrun --nproc_per_node 8 -m biformer detect train --data ROOT --output RUN   # DDP
    biformer detect train --resume RUN                # continue a stopped run exactly
    biformer detect eval --checkpoint RUN/best.safetensors --data ROOT [--json]
    biformer detect predict IMAGE --checkpoint RUN/best.safetensors [--output PNG]

Training runs on the shared engine (:mod:`biformer.engine.loop`). Its defaults are the paper's COCO
1x recipe: 12 epochs, AdamW lr 1e-4 (weight decay 0.05 for Mask R-CNN, 1e-4 for RetinaNet; none on
norms and biases), linear warmup over 500 steps, lr x0.1 after epochs 8 and 11, drop path 0.2,
n_win 16, 800x1333 inputs, random horizontal flip. The paper used 16 images per update (8 GPUs x 2).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from ..demo_data import add_demo_arguments
from ..engine.options import add_engine_arguments
from ..errors import UserValueError
from ..images import SAMPLE_IMAGES

if TYPE_CHECKING:  # torch loads when an action runs, so --help answers at once
    import torch

# the detectors of .models.BUILDERS, named here without importing them (a test checks they agree)
MODELS = ("mask_rcnn", "retinanet")
WEIGHT_DECAY = {"mask_rcnn": 0.05, "retinanet": 1e-4}  # the paper's configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train a detector on a COCO-layout root",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--data", help="COCO-layout ROOT: train/, val/, annotations/instances_{train,val}.json")
    train.add_argument("--model", choices=MODELS, default="mask_rcnn")
    train.add_argument("--backbone", default="biformer_small", help="biformer_tiny/small/base/stl")
    train.add_argument("--backbone-kwargs", default=None, help='extra BiFormer kwargs as JSON, e.g. \'{"depths": [1,1,2,1]}\'')
    train.add_argument("--model-kwargs", default=None,
                       help='extra builder kwargs as JSON, e.g. \'{"fpn_channels": 128, "box_batch_size_per_image": 128}\'')
    train.add_argument("--pretrained-backbone", default=None, help="ImageNet classification checkpoint (ours or original)")
    train.add_argument("--n-win", type=int, default=16, help="regions per side of the routed attention")
    train.add_argument("--drop-path", type=float, default=0.2, help="stochastic depth of the backbone")
    train.add_argument("--min-size", type=int, default=800, help="short side the model resizes images to")
    train.add_argument("--max-size", type=int, default=1333, help="cap on the long side")
    train.add_argument("--milestones", type=float, nargs="*", default=[8, 11], help="epochs after which lr x0.1")
    add_engine_arguments(train, epochs=12, batch_size=2, lr=1e-4, warmup_steps=500)

    ev = sub.add_parser("eval", help="COCO mAP of a trained detector")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, help="COCO-layout ROOT (see train)")
    ev.add_argument("--split", default="val", help="ROOT/SPLIT/ and ROOT/annotations/instances_SPLIT.json")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--verbose", action="store_true", help="print pycocotools' full summary")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")

    pr = sub.add_parser("predict", help="draw detections on an image to a PNG")
    pr.add_argument("image", help=f"image file, or a scikit-image sample: {', '.join(SAMPLE_IMAGES)}")
    pr.add_argument("--checkpoint", default=None, help="trained detector; without it an untrained model is used")
    pr.add_argument("--model", choices=MODELS, default="mask_rcnn", help="untrained model (no --checkpoint)")
    pr.add_argument("--backbone", default="biformer_small", help="untrained model's backbone (no --checkpoint)")
    pr.add_argument("--output", default=None, help="also draw the detections to this PNG")
    pr.add_argument("--score-threshold", type=float, default=0.5,
                    help="draw detections scoring at least this (also lowers the model's own 0.05 cut-off)")
    pr.add_argument("--max-detections", type=int, default=100, help="keep at most this many per image")
    pr.add_argument("--max-memory-gb", type=float, default=None,
                    help="refuse inputs estimated to need more memory than this (default: half the RAM)")
    pr.add_argument("--device", default="auto")

    demo = sub.add_parser("demo-data", help="write a small synthetic COCO-format dataset of shapes")
    add_demo_arguments(demo, "train/, val/, annotations/instances_{train,val}.json", num_train=64, num_val=16)


def _format(metrics: Dict[str, float]) -> str:
    from .engine import COCO_METRICS

    lines = []
    for kind in ("bbox", "segm"):
        if f"{kind}_AP" in metrics:
            lines.append(f"{kind}: " + "  ".join(f"{k} {100 * metrics[f'{kind}_{k}']:.1f}" for k in COCO_METRICS))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from ..engine.loop import (ENGINE_NON_NEGATIVE, ENGINE_POSITIVE, engine_config, resolve_options,
                               run_config_text, run_task)
    from ..resources import check_arguments, json_argument
    from .training import DetectionTask

    options, resume = resolve_options(args, "biformer detect train")
    if not options.get("data"):
        raise UserValueError("biformer detect train: give --data ROOT (a COCO-layout folder)")
    check_arguments(argparse.Namespace(**options), positive=("n_win", *ENGINE_POSITIVE),
                    non_negative=("drop_path", "milestones", *ENGINE_NON_NEGATIVE), at_least_32=("min_size", "max_size"))
    backbone_kwargs = json_argument(options["backbone_kwargs"], "--backbone-kwargs")
    model_kwargs = json_argument(options["model_kwargs"], "--model-kwargs")

    def setup(runtime: Any) -> Tuple[DetectionTask, Any, str]:
        task = DetectionTask(options, backbone_kwargs, model_kwargs)
        schedule = dict(policy="step", warmup_steps=options["warmup_steps"], warmup_ratio=1e-3,
                        milestones=tuple(options["milestones"]))
        header = ["biformer detect train: this run's options. Continue it: biformer detect train --resume RUN"]
        return task, engine_config(options, WEIGHT_DECAY[options["model"]], schedule), run_config_text(options, header)

    run_task(options["device"], setup, resume, args.overwrite)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..engine.runtime import init_runtime, shutdown
    from .data import CocoDetection, _read_coco_json
    from .engine import evaluate_coco
    from .models import load_detector
    from .training import coco_split

    images, annotations = coco_split(args.data, args.split)
    _read_coco_json(annotations)  # a broken annotation file is named before the checkpoint loads
    runtime = init_runtime(args.device)
    try:
        model, info = load_detector(args.checkpoint)
        dataset = CocoDetection(images, annotations, masks=info["builder"] == "mask_rcnn")
        if dataset.class_names != info["class_names"]:
            raise UserValueError(f"the annotations' classes {dataset.class_names[:5]}... differ from the checkpoint's "
                                 f"{info['class_names'][:5]}...")
        metrics = evaluate_coco(model.to(runtime.device), dataset, runtime.device, verbose=args.verbose,
                                runtime=runtime)
    finally:
        shutdown(runtime)
    if runtime.is_main:
        if args.json:
            print(json.dumps({"model": info["builder"], "num_images": len(dataset), **metrics}, indent=2))
        else:
            print(f"{info['builder']} on {len(dataset)} images:\n{_format(metrics)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from ..engine.runtime import resolve_device
    from ..images import load_image
    from ..resources import check_arguments, check_aspect, check_memory
    from .engine import draw_detections
    from .models import BUILDERS, load_detector

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
    with torch.no_grad():
        output = model([image.float().div(255).to(device)])[0]
    drawn = draw_detections(image, output, names, score_threshold=args.score_threshold)
    keep = output["scores"] >= args.score_threshold
    wrote = ""
    if args.output:  # nothing is written unless asked
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)
        wrote = f"; wrote {path} ({drawn.shape[2]}x{drawn.shape[1]})"
    print(f"{int(keep.sum())} detections with score >= {args.score_threshold}{wrote}")
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
    from ..demo_data import write_new_folder
    from ..resources import check_arguments
    from .synthetic import write_coco_shapes

    check_arguments(args, positive=("num_train", "num_val"))
    root = write_new_folder(args.root, lambda folder: write_coco_shapes(
        folder, num_train=args.num_train, num_val=args.num_val, seed=args.seed))
    print(f"wrote {args.num_train} train and {args.num_val} val images with COCO annotations to {root}; "
          f"train on them: biformer detect train --data {root} --output RUN")
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"train": _train, "eval": _eval, "predict": _predict, "demo-data": _demo_data}
    return actions[args.action](args)
