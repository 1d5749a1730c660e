"""``biformer visualize``: draw where queries route and attend.

    biformer visualize astronaut --output out.png
    biformer visualize photo.jpg --checkpoint model.safetensors --stage 3 --query 250,120 --query 80,300 --output out.png
    biformer visualize coffee --checkpoint model.safetensors --all-queries --output freq.png

Stages are numbered 1..4 as in the paper; stage 4 of BiFormer uses global attention (no routing),
so 1..3 can be drawn, and the default is 3 (the paper's figures). Blocks count from 0; -1 = last.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any, Dict, List, Tuple

from ..errors import UserValueError
# the names only (= .images.BUNDLED_IMAGES, a test checks): .images imports torch, and --help must not
BUNDLED_IMAGES = ("astronaut", "coffee", "chelsea")
from .._extras import require


def _point(text: str) -> Tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"got query {text!r}, expected x,y in image pixels, e.g. 250,120") from None
    return x, y


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image",
                        help=f"image file, or one of the photos bundled with scikit-image: {', '.join(BUNDLED_IMAGES)}")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="trained checkpoint (ours from `biformer train`, the original's format, "
                        "or hf-hub:ORG/NAME)")
    source.add_argument("--model", default=None,
                        help="registered model name for a random-init model (default biformer_tiny; the picture then means nothing)")
    parser.add_argument("--stage", type=int, default=3, help="routed stage, numbered 1..4 as in the paper (default: 3; stage 4 has no routing)")
    parser.add_argument("--block", type=int, default=-1, help="block within the stage, from 0; -1 = last (default)")
    parser.add_argument("--query", type=_point, action="append", default=None, metavar="X,Y",
                        help="query point in the image's pixels; repeat for several (default: three spread points)")
    parser.add_argument("--head", default="mean", help="'mean' over heads (default), 'all' (one panel per head), or a head index")
    parser.add_argument("--all-queries", action="store_true",
                        help="instead: how often each region is routed to, over all query regions, per routed stage")
    parser.add_argument("--size", type=int, default=224, help="shorter side of the model input (default: 224); both sides are rounded to a multiple of "
                             "112 for n_win=7 models, so every routed stage splits into 7x7 regions without padding")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="refuse inputs estimated to need more memory than this (default: half the RAM)")
    parser.add_argument("--output", required=True, help="output PNG")
    parser.add_argument("--json", action="store_true", help="print the routing numbers as JSON")


def _load(args: argparse.Namespace) -> Tuple[Any, str, bool]:
    """(model, name, untrained)."""
    if args.checkpoint:
        from ..checkpoint import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        return loaded.model, loaded.model_name, False
    import timm

    from .. import models  # noqa: F401  (registers the variants with timm)

    name = args.model or "biformer_tiny"
    if name not in timm.list_models("biformer*"):
        raise UserValueError(f"got --model {name!r}, expected one of {timm.list_models('biformer*')}")
    return timm.create_model(name), name, True


def _summary(result: Any) -> List[str]:
    lines = []
    if hasattr(result, "queries"):
        g = result.grid
        lines.append(f"{result.layer_name}: {g.height}x{g.width} tokens, {g.rows}x{g.cols} regions of {g.region_h}x{g.region_w}")
        for q in result.queries:
            lines.append(f"  query ({q.point[0]:.0f}, {q.point[1]:.0f}) -> token {q.token}, region {q.region}; "
                         f"routes to {q.routed.tolist()}")
    else:
        for stage, s in result.stats.items():
            lines.append(f"stage {stage} (mean of {s['blocks']} blocks, top-{s['topk']}): entropy {s['entropy']:.3f}, "
                         f"top region share {s['top_region_share']:.3f}, self-routed {s['self_routed']:.2f}, "
                         f"mean distance {s['mean_distance']:.2f} regions")
    return lines


def run(args: argparse.Namespace) -> int:
    require("matplotlib", extra="viz")  # one clear error when the extra is absent
    import matplotlib

    matplotlib.use("Agg")
    from .figures import UNTRAINED_NOTE, UntrainedModelWarning, visualize_queries, visualize_routing_frequency

    from ..resources import check_arguments

    check_arguments(args, at_least_32=("size",), positive=("max_memory_gb",))
    model, name, untrained = _load(args)
    if untrained:
        print(f"warning: no --checkpoint, so {name} has random weights. {UNTRAINED_NOTE}.", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)  # said once above, in words
        if args.all_queries:
            result = visualize_routing_frequency(model, args.image, block=args.block, size=args.size,
                                                 untrained=untrained, name=name, max_memory_gb=args.max_memory_gb)
        else:
            result = visualize_queries(model, args.image, queries=args.query, stage=args.stage, block=args.block,
                                       head=args.head, size=args.size, untrained=untrained, name=name,
                                       max_memory_gb=args.max_memory_gb)
    result.figure.savefig(args.output)
    out: Dict[str, Any] = {"output": args.output, "model": name, **result.to_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(_summary(result)))
        print(f"figure written to {args.output}")
    return 0
