"""``demo-data ROOT``, the same for every task (``classify``, ``detect``, ``segment``): a small dataset
written to a new folder, to try the task's commands without downloads.

ROOT must be new or an empty folder: nothing a user had is overwritten. The files go to a hidden
folder beside ROOT that is renamed to ROOT once complete, so an interrupted run leaves no half-written
dataset behind.
"""
from __future__ import annotations

import argparse
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import UserError

PathLike = Union[str, "os.PathLike[str]"]


def add_demo_arguments(parser: argparse.ArgumentParser, layout: str, num_train: Optional[int], num_val: Optional[int],
                       seed: bool = True) -> None:
    """ROOT and the image counts; ``None`` counts mean "all" (a dataset of fixed size)."""
    parser.add_argument("root", metavar="ROOT", help=f"a new (or empty) folder to write: {layout}")
    for split, default in (("train", num_train), ("val", num_val)):
        shown = "all" if default is None else default
        parser.add_argument(f"--num-{split}", type=int, default=default, metavar="N",
                            help=f"{split} images (default: {shown})")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of the random scenes (default: 0)")


def write_new_folder(root: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(folder)`` on a fresh hidden folder beside ``root``, then rename it to ``root``.
    ``root`` that exists and is not an empty folder is refused before anything is written."""
    root = Path(root)
    if root.is_file() or root.is_symlink():
        raise UserError(f"got ROOT {str(root)!r}, which is a file; expected a new folder")
    if root.is_dir() and any(root.iterdir()):
        raise UserError(f"got ROOT {str(root)!r}, which is not empty; expected a new or empty folder "
                        "(demo-data never overwrites)")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.{uuid.uuid4().hex[:8]}.tmp"
    partial.mkdir()
    try:
        write(partial)
        if root.is_dir():
            root.rmdir()  # empty, as checked; fails (keeping it) if something appeared there meanwhile
        os.replace(partial, root)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return root


__all__ = ["add_demo_arguments", "write_new_folder"]
