"""The ``biformer`` command (also ``python -m biformer``).

Each subcommand lives in its own module, imported only when that subcommand runs, and exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, one-line help)
COMMANDS = {
    "classify": ("biformer.classification.cli", "image classification: train, eval, predict, demo-data"),
    "detect": ("biformer.detection.cli", "object detection: train, eval, predict, demo-data"),
    "segment": ("biformer.segmentation.cli", "semantic segmentation: train, eval, predict, demo-data"),
    "train": ("biformer.classification.cli_train",
              "= classify train: train a classifier (no data argument: the bundled digits demo)"),
    "eval": ("biformer.classification.cli_eval",
             "= classify eval: top-1/top-5, loss, per-class accuracy of a checkpoint"),
    "predict": ("biformer.classification.cli_predict", "= classify predict: top-k labels for images with a checkpoint"),
    "convert": ("biformer.cli_convert", "convert an original BiFormer checkpoint to safetensors"),
    "flops": ("biformer.analysis.cli_flops", "parameters and FLOPs per stage of a model"),
    "complexity": ("biformer.analysis.cli_complexity", "FLOPs of one BRA layer against the region count S"),
    "visualize": ("biformer.viz.cli", "draw where queries route and attend"),
    "explore": ("biformer.viz.cli_explore", "write a self-contained HTML page to explore the routing by clicking"),
    "bench": ("biformer.bench.cli", "benchmark BRA backends and whole models against baselines"),
    "ablate": ("biformer.ablate.cli", "the attention ablation: BRA against other token mixers in one skeleton"),
    "push-to-hub": ("biformer.hub", "share a run or checkpoint on the Hugging Face Hub in timm's layout"),
}


# commands that train or evaluate for a while on the CPU: their OpenMP threads sleep rather than spin
# while waiting, so a core held by another process does not stall every op (see engine/threads.py)
THREADED = frozenset({"classify", "train", "eval", "detect", "segment"})


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: biformer COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "train, eval and predict are shorthands for classify train, classify eval and classify predict.",
              "biformer COMMAND --help shows a command's options (biformer TASK ACTION --help for a task's action)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"biformer: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"biformer {name}: this command is not available in this build ({e})", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"biformer {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from .errors import UserError

    if name in THREADED:
        from .engine.threads import set_openmp_passive

        set_openmp_passive()  # read once, when torch loads, so before any torch import
    importlib.import_module("biformer.models")  # registers the models with timm (deferred for --help)
    try:
        return int(module.run(args) or 0)
    except UserError as e:  # bad input: one line; anything else keeps its traceback
        print(f"biformer {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The message on one line: a message quoting a file's text may hold newlines."""
    return " ".join(str(error).split())
