"""Class colours and a label font for drawn predictions."""
from __future__ import annotations

from typing import List, Tuple
from .._extras import require

__all__ = ["class_colors", "label_font_path"]


def class_colors(num: int) -> List[Tuple[int, int, int]]:
    """``num`` distinct, stable RGB colours (class ``i`` always gets the same one)."""
    import colorsys

    # golden-ratio hue steps keep neighbouring class indices far apart in hue
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75 if i % 2 else 0.95, 0.95))
        for i in range(num)
    ]  # type: ignore[misc]


def label_font_path() -> str:
    """A TrueType font that is always present (matplotlib ships DejaVu Sans)."""
    require("matplotlib", extra="viz")  # one clear error when the extra is absent
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")
