"""``biformer flops MODEL [--size H W] [--json]``: parameters and FLOPs per stage."""
from __future__ import annotations

import argparse
import json

from ..errors import UserValueError
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the counting imports torch: only when the command runs, so --help is instant
    from .flops import FlopReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a registered BiFormer (biformer_tiny, biformer_small, biformer_base, biformer_stl)")
    parser.add_argument("--size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"),
                        help="input height and width (default: 224 224)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier width (default: 1000, as the paper)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _registered_biformers() -> list:
    import timm

    from .. import models  # noqa: F401  (registers the variants with timm)

    return timm.list_models("biformer*")


def format_report(report: FlopReport) -> str:
    h, w = report.input_size
    lines = [
        f"{report.model_name} at {h}x{w}, batch 1",
        f"{'part':<8} {'params':>11} {'GFLOPs':>9} {'GFLOPs complete':>16} {'gather MB':>10}",
    ]
    rows = [(p.name, p.params, p.flops, p.flops_complete, p.gather_bytes) for p in report.parts]
    rows.append(("total", report.params, report.flops, report.flops_complete, report.gather_bytes))
    for name, params, flops, complete, moved in rows:
        lines.append(f"{name:<8} {params / 1e6:>10.3f}M {flops / 1e9:>9.3f} {complete / 1e9:>16.3f} {moved / 1e6:>10.1f}")
    lines += [
        "",
        "GFLOPs: paper-compatible (fvcore defaults, 1 multiply-add = 1 FLOP; softmax, top-k, gathers and",
        "        elementwise ops not counted; fused attention counted as its two matmuls).",
        "GFLOPs complete: also softmax (5/elt), top-k and means (1/input elt), elementwise ops (1/elt).",
        "gather MB: bytes read + written by the routed key/value gathers.",
    ]
    if report.uncounted_ops:
        lines.append("not counted by either: " + ", ".join(f"{k} x{v}" for k, v in sorted(report.uncounted_ops.items())))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import timm

    names = _registered_biformers()
    if args.model not in names:
        raise UserValueError(f"got model {args.model!r}, expected one of the registered BiFormers {names}")
    if not 0 <= args.num_classes <= 100_000:
        raise UserValueError(f"got --num-classes {args.num_classes}, expected 0..100000")
    model = timm.create_model(args.model, num_classes=args.num_classes)
    from .flops import count_flops

    report = count_flops(model, tuple(args.size), model_name=args.model)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
