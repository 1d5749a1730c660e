"""``biformer convert``: an original BiFormer checkpoint (or ours) to our safetensors file.

Kept apart from :mod:`biformer.checkpoint`, which imports torch, so that ``--help`` answers at once.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint in the original's format (.pth/.pt/.safetensors; raw, 'model' or "
                        "'state_dict'), ours, or hf-hub:ORG/NAME")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--model", default=None, help="variant name; inferred from the tensor shapes when omitted")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import convert

    name = convert(args.src, args.dst, args.model)
    print(f"converted {args.src} -> {args.dst} ({name})")
    return 0


__all__ = ["add_arguments", "run"]
