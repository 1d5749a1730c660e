"""``biformer classify``: train, evaluate and run BiFormer classifiers, in the grammar of ``detect`` and ``segment``.

    biformer classify demo-data ROOT                  # the bundled digits as an ImageFolder (train/, val/)
    biformer classify train --data ROOT --preset digits --output RUN
    biformer classify eval --checkpoint RUN/best.safetensors --data ROOT [--json]
    biformer classify predict IMAGE... --checkpoint RUN/best.safetensors [--json]

``biformer train``, ``biformer eval`` and ``biformer predict`` are shorthands for the first three
actions: the same modules, options and behaviour.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Dict, Tuple

from ..demo_data import add_demo_arguments

# action -> (module with add_arguments and run, one-line help); the same modules as `biformer train|eval|predict`
ACTIONS: Dict[str, Tuple[str, str]] = {
    "train": ("biformer.classification.cli_train",
              "train a classifier (no data argument: the bundled digits demo)"),
    "eval": ("biformer.classification.cli_eval", "evaluate a checkpoint: top-1/top-5, loss, per-class accuracy"),
    "predict": ("biformer.classification.cli_predict", "top-k labels for images with a checkpoint"),
}
DEMO_HELP = "write the bundled digits as an ImageFolder (train/ and val/ class folders of 8x8 PNGs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, (module, help_) in ACTIONS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(action, help=help_, description=help_))
    demo = sub.add_parser("demo-data", help=DEMO_HELP, description=DEMO_HELP)
    add_demo_arguments(demo, "train/<digit>/*.png and val/<digit>/*.png", num_train=None, num_val=None, seed=False)


def _demo_data(args: argparse.Namespace) -> int:
    from ..demo_data import write_new_folder
    from ..resources import check_arguments
    from .data import export_digits

    check_arguments(args, positive=("num_train", "num_val"))
    written: Dict[str, int] = {}
    root = write_new_folder(args.root, lambda folder: written.update(
        export_digits(folder, num_train=args.num_train, num_val=args.num_val)))
    print(f"wrote {written['train']} train and {written['val']} val digit images to {root}; train on them: "
          f"biformer classify train --data {root} --preset digits --output RUN")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "demo-data":
        return _demo_data(args)
    return importlib.import_module(ACTIONS[args.action][0]).run(args)


__all__ = ["ACTIONS", "add_arguments", "run"]
