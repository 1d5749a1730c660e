"""Helpers of ``biformer eval`` and ``predict``: numeric option checks and readable class labels.
Checkpoints load through :func:`biformer.checkpoint.load_checkpoint`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Sequence

from ..errors import UserValueError

if TYPE_CHECKING:
    from ..checkpoint import LoadedCheckpoint


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
