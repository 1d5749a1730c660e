"""The page of ``biformer explore`` (:mod:`.cli_explore`): a self-contained HTML page to explore the
routing by clicking.

    biformer explore --checkpoint runs/digits/best.safetensors astronaut photo.jpg --output explorer.html

The page holds everything (no server, no network): each image as a data URI, and for every routed
layer the routed regions of every query region (exact), how often each region is routed to (exact),
and the token attention of the query tokens (8-bit, scaled per query token and head; every token
when the size budget allows, else one token in ``stride x stride`` per region). Colours follow
``biformer visualize``: ranks from red (best) to blue on ``turbo``, attention on ``inferno``,
frequency on ``magma``.

A URL fragment selects a view and clicks a point, so a view can be shared:
``explorer.html#image=0&stage=3&block=-1&head=mean&x=120&y=80`` (``x, y`` in the page's image pixels).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from .capture import CapturedLayer
from .figures import UNTRAINED_NOTE, _forward, _frequency, _prepare
from .images import ImageLike, load_image
from .._extras import require

__all__ = ["ExplorerImage", "build_explorer_data", "layer_data", "write_explorer"]

DEFAULT_ATTENTION_MB = 8.0  # raw attention bytes per image before query tokens are subsampled


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _hex_colours(cmap: str, values: Sequence[float]) -> List[str]:
    require("matplotlib", extra="viz")  # one clear error when the extra is absent
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.asarray(values, dtype=float))
    return ["#%02x%02x%02x" % tuple(int(round(255 * c)) for c in colour[:3]) for colour in rgba]


def rank_colours(topk: int) -> List[str]:
    """The colour of each routing rank, best first: ``visualize``'s turbo from red to blue."""
    return _hex_colours("turbo", np.linspace(0.95, 0.1, max(topk, 2))[:topk])


def _stride_for(layer: CapturedLayer, budget_bytes: float) -> int:
    """The smallest query-token stride whose attention fits ``budget_bytes`` (1 = every token)."""
    grid = layer.grid
    p, heads, t, keys = layer.attention.shape[1:]
    side = max(grid.region_h, grid.region_w)  # at this stride one token per region is left
    stride = 1
    while stride < side and p * heads * math.ceil(grid.region_h / stride) * math.ceil(grid.region_w / stride) * keys > budget_bytes:
        stride *= 2
    return min(stride, side)


def layer_data(layer: CapturedLayer, budget_bytes: float) -> Dict[str, Any]:
    """One routed layer of the first image, as the page reads it (arrays as base64)."""
    grid = layer.grid
    indices = layer.indices[0].cpu().numpy()  # (P, topk)
    attention = layer.attention[0].float().cpu()  # (P, heads, T, topk*T)
    p, heads, t, keys = attention.shape
    stride = _stride_for(layer, budget_bytes)
    rows = torch.arange(grid.region_h)[::stride]
    cols = torch.arange(grid.region_w)[::stride]
    kept = (rows[:, None] * grid.region_w + cols[None, :]).reshape(-1)  # stored query tokens, row-major
    attention = attention[:, :, kept]  # (P, heads, T_kept, topk*T)
    scale = attention.amax(dim=-1).clamp_min(1e-12)  # (P, heads, T_kept): each row's own maximum
    quantised = torch.round(attention / scale[..., None] * 255).to(torch.uint8)
    return {
        "stage": layer.stage, "block": layer.block, "name": layer.name,
        "map": list(layer.map_size), "rows": grid.rows, "cols": grid.cols,
        "region": [grid.region_h, grid.region_w], "topk": int(indices.shape[-1]), "heads": heads,
        "indices": _b64(indices.astype(np.uint16)),
        "frequency": _frequency(layer).astype(int).tolist(),
        "stride": stride, "kept": int(kept.numel()),
        "attention": _b64(quantised.numpy()), "scale": _b64(scale.numpy().astype(np.float32)),
        "colours": rank_colours(int(indices.shape[-1])),
    }


@dataclass
class ExplorerImage:
    label: str
    image: ImageLike


def _image_uri(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG" if min(array.shape[:2]) < 96 else "JPEG", quality=92)
    kind = "png" if min(array.shape[:2]) < 96 else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_explorer_data(
    model: nn.Module,
    images: Sequence[ExplorerImage],
    *,
    name: str,
    weights: Optional[str],
    size: int = 224,
    attention_mb: float = DEFAULT_ATTENTION_MB,
) -> Dict[str, Any]:
    """Everything the page shows, for every image and every routed layer."""
    entries = []
    for item in images:
        original = load_image(item.image)
        _, x, shown = _prepare(model, original, size)
        capture = _forward(model, x, attention=True)
        layers = [l for l in capture.layers.values() if l.stage is not None]
        if not layers:
            raise UserError(f"{name} has no routed layer inside stages.i.blocks.j to explore")
        budget = attention_mb * 2 ** 20 / len(layers)
        entries.append({
            "label": item.label, "original": list(original.shape[:2]), "size": list(shown.shape[:2]),
            "src": _image_uri(shown), "layers": [layer_data(l, budget) for l in layers],
        })
    return {
        "model": name, "weights": weights, "untrained": weights is None, "untrained_note": UNTRAINED_NOTE,
        "images": entries,
        "inferno": _hex_colours("inferno", np.linspace(0, 1, 256)),
        "magma": _hex_colours("magma", np.linspace(0, 1, 256)),
    }


def render_html(data: Dict[str, Any]) -> str:
    template = resources.files("biformer.viz").joinpath("explore.html").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # safe inside <script>
    title = f"BiFormer routing explorer: {data['model']}"
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_explorer(
    model: nn.Module,
    images: Sequence[ExplorerImage],
    output: str,
    *,
    name: str,
    weights: Optional[str],
    size: int = 224,
    attention_mb: float = DEFAULT_ATTENTION_MB,
) -> int:
    """Write the page to ``output`` (atomically); returns its size in bytes."""
    from ..checkpoint import atomic_write

    page = render_html(build_explorer_data(model, images, name=name, weights=weights, size=size,
                                           attention_mb=attention_mb)).encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(page)

    atomic_write(output, write)
    return len(page)
