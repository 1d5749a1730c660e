"""``biformer train``: train a classifier on a laptop CPU, one GPU or many GPUs/nodes under torchrun."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

from ..errors import UserError, UserValueError
from .config import (
    CONFIG_FIELDS,
    TrainConfig,
    add_config_arguments,
    build_config,
    explicit_overrides,
    load_yaml,
)

# What may change when a run is resumed: where and how it runs, never what it computes.
RESUME_OVERRIDES = frozenset({"data", "device", "num_workers", "progress", "tensorboard", "log_interval", "save_every"})

EXAMPLES = """examples:
  biformer train --output runs/digits            # the bundled digits: about a minute on a 2-core CPU
  biformer train --data /data/imagenet --output runs/tiny      # the paper's ImageNet recipe, BiFormer-T
  biformer train --config configs/train/imagenet_biformer_small.yaml --data /data/imagenet
  torchrun --standalone --nproc_per_node 8 -m biformer train --data /data/imagenet --output runs/tiny
  biformer train --resume runs/tiny              # continue a stopped run where it stopped
  biformer train --output runs/tiny --overwrite  # start again in a folder that holds a run

One run at a time per --output: the folder is locked (OUT/.lock) while a run uses it.

Precedence: preset < --config YAML < flags. Every flag is also a YAML key (--batch-size: batch_size).
Outputs in --output: config.yaml, best/last.safetensors, state.pt, metrics.csv, steps.csv, tb/, curves.png.
See docs/training.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="YAML file of options (flags given here override it)")
    parser.add_argument("--resume", metavar="DIR", default=None,
                        help="continue the run in DIR from its last checkpoint, with its config.yaml")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --output folder that holds a previous run's results, "
                             "removing them (it lists what it removes); without it such a folder is refused")
    add_config_arguments(parser)


def load_config(args: argparse.Namespace) -> TrainConfig:
    overrides: Dict[str, Any] = explicit_overrides(args)
    if args.resume is None:
        return build_config(overrides, args.config)
    if args.config:
        raise UserValueError("--resume continues a run with its own config.yaml; drop --config")
    if getattr(args, "overwrite", False):
        raise UserValueError("got both --resume and --overwrite; --resume continues the run, --overwrite starts again")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"no run to resume at {str(run_dir)!r} (it has no config.yaml)")
    saved = load_yaml(run_dir / "config.yaml")
    changed = sorted(k for k in set(overrides) - RESUME_OVERRIDES if overrides[k] != saved.get(k))
    if changed:
        raise UserValueError(f"cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} when resuming; "
                             f"only {', '.join(sorted(RESUME_OVERRIDES))} may change")
    cfg = build_config(overrides, base=saved)
    cfg.output = str(run_dir)
    return cfg


def run(args: argparse.Namespace) -> int:
    from .training import train

    train(load_config(args), resume=args.resume is not None, overwrite=getattr(args, "overwrite", False))
    return 0


__all__ = ["CONFIG_FIELDS", "add_arguments", "load_config", "run"]
