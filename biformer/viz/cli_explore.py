"""``biformer explore``: one self-contained HTML page to explore the routing by clicking.

    biformer explore --checkpoint runs/digits/best.safetensors astronaut photo.jpg --output explorer.html

The page and what it holds are :mod:`biformer.viz.explore`'s; this module only parses the command
line, so that ``--help`` answers without loading torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from .cli import BUNDLED_IMAGES

DEFAULT_ATTENTION_MB = 8.0  # = .explore.DEFAULT_ATTENTION_MB (a test checks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help=f"image files or bundled photos ({', '.join(BUNDLED_IMAGES)}); default: all bundled photos")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="CKPT",
                        help="trained checkpoint (ours, the original's, or hf-hub:ORG/NAME)")
    source.add_argument("--model", default=None,
                        help="registered model name for a random-init model (default biformer_tiny; the page then means nothing)")
    parser.add_argument("--size", type=int, default=224,
                        help="shorter side of the model input (default: 224), rounded as in `biformer visualize`")
    parser.add_argument("--attention-mb", type=float, default=DEFAULT_ATTENTION_MB, metavar="MB",
                        help=f"attention bytes per image before query tokens are subsampled (default: {DEFAULT_ATTENTION_MB:g})")
    parser.add_argument("--output", required=True, help="output .html file")


def run(args: argparse.Namespace) -> int:
    import warnings

    from .cli import _load
    from .explore import ExplorerImage, write_explorer
    from .figures import UNTRAINED_NOTE, UntrainedModelWarning

    if args.size < 32:
        raise UserError(f"got --size {args.size}, expected at least 32 (the model's total stride)")
    if args.attention_mb <= 0:
        raise UserError(f"got --attention-mb {args.attention_mb:g}, expected a positive size")
    for item in args.images:
        if item not in BUNDLED_IMAGES and not Path(item).is_file():
            raise UserError(f"no image file at {item!r}; expected a file or one of the bundled photos {BUNDLED_IMAGES}")
    model, name, untrained = _load(args)  # an hf-hub:ORG/NAME checkpoint is fetched here
    if untrained:
        print(f"warning: no --checkpoint, so {name} has random weights. {UNTRAINED_NOTE}.", file=sys.stderr)
    images = [ExplorerImage(Path(i).name if i not in BUNDLED_IMAGES else i, i) for i in (args.images or BUNDLED_IMAGES)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        size = write_explorer(model, images, args.output, name=name, weights=None if untrained else args.checkpoint,
                              size=args.size, attention_mb=args.attention_mb)
    print(f"wrote {args.output} ({size / 2 ** 20:.2f} MB, {len(images)} image(s)); open it in any browser")
    return 0


__all__ = ["add_arguments", "run"]
