"""Checkpoint files: safe loading, our safetensors format, and conversion of the original's.

No path here unpickles code: ``.safetensors`` files are read with safetensors, anything else with
``torch.load(weights_only=True)``, which refuses pickles that would run code.

Our files are safetensors whose metadata names the model and the kwargs that rebuild it::

    {"format": "biformer", "model_name": "biformer_tiny", "model_kwargs": "{\"num_classes\": 10}",
     "pretrained_cfg": "{...mean, std, input_size, crop_pct...}"}
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .models.biformer import (
    MODEL_ARGS,
    CheckpointMismatchError,
    checkpoint_filter_fn,
    is_original_state_dict,
    unwrap_state_dict,
)

PathLike = Union[str, os.PathLike]
FORMAT = "biformer"
_PREPROCESS_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (missing, truncated, not a checkpoint, or unsafe)."""


def read_state_dict(path: PathLike) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Read tensors and metadata from a ``.safetensors`` or ``torch.save`` file, unwrapping
    ``{"model": ...}`` / ``{"state_dict": ...}``. Never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    if _is_safetensors(path):
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {e}") from e
        return tensors, metadata
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise CheckpointError(
            f"refusing or unable to load {str(path)!r} with weights_only=True: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Only plain tensor checkpoints are accepted; "
            "a pickle that needs arbitrary code is never executed."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, expected a state_dict")
    state_dict = unwrap_state_dict(obj)
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{str(path)!r} has non-tensor entries {bad[:5]}; expected a state_dict")
    return state_dict, {}


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:  # safetensors: 8-byte little-endian header size, then '{'
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, before any threads
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def atomic_write(path: PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``, so no half-written file is ever visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def preprocess_config(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg}


def save_model(
    path: PathLike,
    model: nn.Module,
    model_name: str,
    model_kwargs: Optional[Dict[str, Any]] = None,
    extra_metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Write ``model``'s weights plus what rebuilds it (name, kwargs, preprocessing) atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_name": model_name,
        "model_kwargs": json.dumps(model_kwargs or {}),
        "pretrained_cfg": json.dumps(preprocess_config(model)),
        **(extra_metadata or {}),
    }
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def infer_original_variant(state_dict: Dict[str, Tensor]) -> str:
    """The registered variant whose every non-classifier tensor shape matches ``state_dict``."""
    import timm

    for name in MODEL_ARGS:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0)
        try:
            checkpoint_filter_fn(state_dict, model)
        except CheckpointMismatchError:
            continue
        return name
    raise CheckpointMismatchError(
        f"the checkpoint matches none of the registered variants {list(MODEL_ARGS)}; pass the model name explicitly"
    )


def _num_classes(state_dict: Dict[str, Tensor]) -> int:
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def load_model(
    path: PathLike,
    model_name: Optional[str] = None,
    **overrides: Any,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build and load a model from our checkpoint or from the original's format.

    Returns ``(model, info)`` with ``info`` holding ``model_name``, ``model_kwargs`` and the
    preprocessing config. A checkpoint of another model is refused, naming both.
    """
    import timm

    state_dict, metadata = read_state_dict(path)
    if metadata.get("format") == FORMAT:
        saved_name = metadata["model_name"]
        if model_name is not None and model_name != saved_name:
            raise CheckpointMismatchError(
                f"{str(path)!r} holds a {saved_name} checkpoint, but model {model_name} was asked for"
            )
        model_name = saved_name
        kwargs = json.loads(metadata.get("model_kwargs", "{}"))
        pretrained_cfg = json.loads(metadata.get("pretrained_cfg", "{}"))
    else:
        if model_name is None:
            model_name = infer_original_variant(state_dict)
        kwargs = {"num_classes": _num_classes(state_dict)}
        pretrained_cfg = {}
    kwargs.update(overrides)
    model = timm.create_model(model_name, **kwargs)
    try:
        converted = checkpoint_filter_fn(state_dict, model)
        model.load_state_dict(converted, strict=True)
    except (CheckpointMismatchError, RuntimeError) as e:
        raise CheckpointMismatchError(f"{str(path)!r} does not fit model {model_name}: {e}") from e
    if pretrained_cfg:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **pretrained_cfg}
    return model, {"model_name": model_name, "model_kwargs": kwargs, "pretrained_cfg": preprocess_config(model)}


def convert(src: PathLike, dst: PathLike, model_name: Optional[str] = None) -> str:
    """Convert a checkpoint in the original's format (or ours) to our safetensors file. Returns the model name."""
    model, info = load_model(src, model_name)
    save_model(dst, model, info["model_name"], info["model_kwargs"])
    return info["model_name"]


# ---- `biformer convert` ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint in the original's format (.pth/.pt/.safetensors; raw, 'model' or 'state_dict')")
    parser.add_argument("dst", help="output .safetensors file")
    parser.add_argument("--model", default=None, help="variant name; inferred from the tensor shapes when omitted")


def run(args: argparse.Namespace) -> int:
    name = convert(args.src, args.dst, args.model)
    print(f"converted {args.src} -> {args.dst} ({name})")
    return 0


__all__ = [
    "CheckpointError",
    "atomic_write",
    "convert",
    "infer_original_variant",
    "is_original_state_dict",
    "load_model",
    "read_state_dict",
    "save_model",
]
