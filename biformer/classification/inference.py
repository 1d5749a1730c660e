"""Loading a checkpoint for evaluation or prediction: the model, its preprocessing and class names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import UserError, UserValueError
from ..models.biformer import CheckpointMismatchError


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    model_name: str
    data_cfg: Dict[str, Any]  # input_size, interpolation, mean, std, crop_pct
    class_names: Optional[List[str]]  # None when the checkpoint does not name its classes
    metadata: Dict[str, str]

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)


def read_metadata(path: str) -> Dict[str, str]:
    """The safetensors metadata of ``path`` (empty for other formats), without reading tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def load_checkpoint(path: str, model_name: Optional[str] = None, device: torch.device = torch.device("cpu"),
                    img_size: Optional[int] = None, crop_pct: Optional[float] = None) -> LoadedCheckpoint:
    """Our checkpoint or the original's (``biformer.checkpoint.load_model``), in eval mode on ``device``.
    ``model_name`` refuses a checkpoint of another model; ``img_size``/``crop_pct`` override the
    saved preprocessing."""
    from timm.data import resolve_data_config

    from ..checkpoint import class_names_of, load_model
    from ..hub import resolve_checkpoint

    path = resolve_checkpoint(path)  # "hf-hub:ORG/NAME" -> its model.safetensors in the Hugging Face cache
    if not Path(path).is_file():
        raise UserError(f"no checkpoint file at {path!r}")
    try:
        model, info = load_model(path, model_name)
    except CheckpointMismatchError:
        _refuse_other_original_variant(path, model_name)
        raise
    metadata = info["metadata"]
    overrides: Dict[str, Any] = {}
    if img_size is not None:
        overrides["input_size"] = (3, img_size, img_size)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    data_cfg = resolve_data_config(pretrained_cfg={**model.pretrained_cfg, **overrides})
    names = class_names_of(path, metadata)
    model.eval().to(device)
    return LoadedCheckpoint(model, info["model_name"], data_cfg, names, metadata)


def check_numbers(args: Any, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                  fractions: Sequence[str] = ()) -> None:
    """Refuse a numeric option out of range, naming the flag: ``positive`` (>= 1 or > 0),
    ``non_negative`` (>= 0), ``fractions`` (in (0, 1]). None means "not given"."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in positive:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserValueError(f"got {flag(name)} {value}, expected a positive number")
    for name in non_negative:
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise UserValueError(f"got {flag(name)} {value}, expected a number >= 0")
    for name in fractions:
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            raise UserValueError(f"got {flag(name)} {value}, expected a fraction in (0, 1]")


def _refuse_other_original_variant(path: str, model_name: Optional[str]) -> None:
    """An original-format checkpoint names no model: tell which variant it is, if it is one."""
    from ..checkpoint import FORMAT, infer_original_variant, read_state_dict

    if model_name is None or read_metadata(path).get("format") == FORMAT:
        return  # our format names its model, and load_model's error says both already
    try:
        variant = infer_original_variant(read_state_dict(path)[0])
    except CheckpointMismatchError:
        return
    if variant != model_name:
        raise CheckpointMismatchError(
            f"{path!r} holds a {variant} checkpoint (original format), but model {model_name} was asked for")


def display_names(ckpt: LoadedCheckpoint) -> List[str]:
    """Readable labels: the saved class names, ImageNet descriptions for 1000-class checkpoints
    (and for ImageNet synset folder names), else the class index."""
    names = ckpt.class_names
    if names is None and ckpt.num_classes == 1000:
        return _imagenet_descriptions()
    if names is not None and len(names) == 1000 and all(n.startswith("n") and n[1:].isdigit() for n in names):
        return _imagenet_descriptions()
    return list(names) if names is not None else [str(i) for i in range(ckpt.num_classes)]


def _imagenet_descriptions() -> List[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_descriptions())
