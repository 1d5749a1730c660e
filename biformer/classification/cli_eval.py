"""``biformer eval``: top-1/top-5, loss and per-class accuracy of a checkpoint.

Runs in one process or under torchrun; the images are sharded without padding and the sums
reduced, so the figures do not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

from ..errors import UserError, UserValueError
from .config import DIGITS

PER_CLASS_PRINT_LIMIT = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="our .safetensors (e.g. runs/x/best.safetensors) or an original-format checkpoint")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="ImageFolder root (DIR/<split>/<class>/...) or the root for --dataset; "
                             "omit both for the digits val split")
    parser.add_argument("--dataset", default=None, metavar="SPEC", help="timm dataset spec, or 'digits'")
    parser.add_argument("--split", default="val", metavar="NAME", help="split to evaluate (default: val)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="expected model name; a checkpoint of another model is refused")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="override the checkpoint's input size")
    parser.add_argument("--crop-pct", type=float, default=None, metavar="X",
                        help="override the checkpoint's center-crop fraction")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N",
                        help="images per process per batch (default: 128)")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="data loading processes (default: min(8, CPUs))")
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--amp", default="none", choices=("auto", "none", "bf16", "fp16"),
                        help="mixed precision (default: none)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (top1, top5, loss, num_images, per_class...) instead of a table")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False, help="progress bar")


def run(args: argparse.Namespace) -> int:
    from . import data as data_lib
    from .engine import evaluate
    from ..checkpoint import load_checkpoint
    from .inference import check_numbers
    from ..engine.runtime import init_runtime, resolve_amp, shutdown

    check_numbers(args, positive=("batch_size", "img_size"), non_negative=("num_workers",), fractions=("crop_pct",))
    runtime = init_runtime(args.device)
    try:
        ckpt = load_checkpoint(args.checkpoint, args.model)
        ckpt.model.eval().to(runtime.device)
        data_cfg = ckpt.data_config(args.img_size, args.crop_pct)
        dataset = args.dataset if args.dataset is not None else (DIGITS if args.data is None else "")
        is_folder = not dataset
        source = data_lib.open_source(dataset, args.data, args.split,
                                      class_names=ckpt.class_names if is_folder else None)
        if source.classes and len(source.classes) > ckpt.num_classes:
            raise UserValueError(f"the data has {len(source.classes)} classes but {ckpt.model_name} in "
                             f"{args.checkpoint!r} has {ckpt.num_classes}")
        samples = data_lib.ImageSamples(source, data_lib.eval_transform(data_cfg), replace_bad=False)
        num_workers = args.num_workers if args.num_workers is not None else data_lib.default_num_workers()
        loader = data_lib.eval_loader(samples, args.batch_size, num_workers, runtime.device,
                                      runtime.world_size, runtime.rank)
        result = evaluate(ckpt.model, loader, ckpt.num_classes, runtime, resolve_amp(args.amp, runtime.device),
                          progress=args.progress)
    finally:
        shutdown(runtime)
    if result.num_nonfinite:  # every rank raises: the sums were reduced, so each knows
        raise UserError(f"{result.num_nonfinite} of {result.num_images} images gave non-finite logits (NaN or inf) "
                        f"with {args.checkpoint!r}; refusing to report an accuracy from them (diverged or damaged "
                        "weights?)")
    if not runtime.is_main:
        return 0
    names = ckpt.class_names or source.classes or None
    report: Dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "model": ckpt.model_name,
        "data": args.data if dataset != DIGITS else "digits",
        "split": args.split,
        **result.to_dict(names),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(report))
    return 0


def _table(report: Dict[str, Any]) -> str:
    lines = [
        f"checkpoint {report['checkpoint']} ({report['model']}), data {report['data']} [{report['split']}]",
        f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}  "
        f"images {report['num_images']}" + (f"  (skipped {report['num_skipped']} unreadable)"
                                            if report["num_skipped"] else ""),
    ]
    per_class = [(name, v["top1"], v["num_images"]) for name, v in report["per_class"].items() if v["num_images"]]
    if len(per_class) > PER_CLASS_PRINT_LIMIT:
        per_class = sorted(per_class, key=lambda item: item[1])[:20]
        lines.append(f"per-class top-1, the 20 lowest of {len(report['per_class'])} (--json lists all):")
    else:
        lines.append("per-class top-1:")
    width = max((len(name) for name, _, _ in per_class), default=0)
    lines += [f"  {name:<{width}}  {acc:6.2f}%  ({n} images)" for name, acc, n in per_class]
    return "\n".join(lines)


__all__: List[str] = ["add_arguments", "run"]
