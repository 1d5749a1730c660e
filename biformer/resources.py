"""Bounds on what one inference may ask for: the input's shape and a memory estimate made before running.

Used by ``biformer visualize``, ``biformer detect predict`` and ``biformer segment predict``: a 1x1000
image once became a 224x224000 input (5.8 GB and growing), and ``--size 100000`` was ended by the
kernel's OOM killer. Each command now refuses, with one line and before allocating, an image too
elongated to be cut into regions, and any input whose estimated memory exceeds ``--max-memory-gb``
(default: half of this machine's RAM).

The estimate (:func:`estimate_inference_bytes`) is deliberately simple and generous. Per routed
(BRA) layer of width ``C``, query/key width ``C_qk``, ``heads``, ``topk`` regions of ``T`` tokens, at a
map of ``L`` tokens, it counts ``L * (16 * C + topk * (C_qk + C) + heads * topk * T)`` float32 values:
the block's working set, the gathered keys and values, and the attention probabilities the
visualisation captures (``L * topk * T`` grows with the square of the map when ``n_win`` is fixed, which
is what exploded). Other attention layers count ``16 * C`` per token. Layers run one after another,
so the largest layer counts, plus 64 floats per input pixel for the input, the decoder and the outputs.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn

from .errors import UserValueError

__all__ = ["MAX_ASPECT", "check_aspect", "check_arguments", "default_memory_limit_gb", "estimate_inference_bytes",
           "check_memory", "json_argument"]

# longest / shortest side beyond which an image cannot sensibly be cut into n_win x n_win regions
MAX_ASPECT = 16.0
_STAGE = re.compile(r"stages\.(\d+)\.blocks\.\d+\.")
_BYTES_PER_FLOAT = 4


def check_arguments(args: Any, *, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                    at_least_32: Sequence[str] = ()) -> None:
    """Refuse command-line numbers out of range, naming the flag (``--batch-size 0``); None means "default"."""
    for names, ok, expected in ((positive, lambda v: v > 0, "a positive number"),
                                (non_negative, lambda v: v >= 0, "0 or more"),
                                (at_least_32, lambda v: v >= 32, "at least 32 pixels (the total stride)")):
        for name in names:
            value = getattr(args, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if v is not None and (not math.isfinite(v) or not ok(v)):
                    flag = "--" + name.replace("_", "-")
                    raise UserValueError(f"got {flag} {' '.join(map(str, values))}, expected {expected}")


def json_argument(text: Optional[str], flag: str) -> Dict[str, Any]:
    """A ``--*-kwargs`` JSON object from the command line ({} for None)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserValueError(f"got {flag} {text!r}, which is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserValueError(f"got {flag} {text!r}, expected a JSON object such as '{{\"depths\": [1, 1, 2, 1]}}'")
    return value


def check_aspect(width: int, height: int, what: str = "image") -> None:
    """Refuse an empty or degenerate (more than :data:`MAX_ASPECT`:1) image."""
    if width < 1 or height < 1:
        raise UserValueError(f"got an empty {what} of {width}x{height} pixels")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise UserValueError(
            f"got a {width}x{height} {what} (aspect ratio {aspect:.0f}:1); expected at most {MAX_ASPECT:.0f}:1, "
            "since a map that elongated cannot be cut into regions at any usable input size. Crop it first"
        )


def default_memory_limit_gb() -> float:
    """Half of the physical memory, or 8 GB where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


def estimate_inference_bytes(model: nn.Module, height: int, width: int) -> int:
    """Rough peak bytes of a batch-1 forward of ``model`` on a ``height x width`` input (see the module doc)."""
    from .layers import BiLevelRoutingAttention, GlobalAttentionLCE

    largest = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, (BiLevelRoutingAttention, GlobalAttentionLCE)):
            continue
        m = _STAGE.search(name + ".")
        stride = 4 * 2 ** int(m.group(1)) if m else 4  # stages 0..3 at strides 4..32; unknown: the finest
        tokens_h, tokens_w = math.ceil(height / stride), math.ceil(width / stride)
        tokens = tokens_h * tokens_w
        floats = 16 * layer.dim * tokens
        if isinstance(layer, BiLevelRoutingAttention):
            if layer.region_size is not None:
                rh, rw = (layer.region_size, layer.region_size) if isinstance(layer.region_size, int) else layer.region_size
            else:
                rows, cols = (layer.n_win, layer.n_win) if isinstance(layer.n_win, int) else layer.n_win
                rh, rw = math.ceil(tokens_h / rows), math.ceil(tokens_w / cols)
            floats += tokens * layer.topk * (layer.qk_dim + layer.dim + layer.num_heads * rh * rw)
        largest = max(largest, floats)
    return (largest + 64 * height * width) * _BYTES_PER_FLOAT


def check_memory(model: nn.Module, height: int, width: int, max_memory_gb: Optional[float],
                 flag: str = "--max-memory-gb") -> int:
    """Refuse an input whose estimated memory exceeds ``max_memory_gb`` (None: :func:`default_memory_limit_gb`).

    Returns the estimate in bytes.
    """
    limit = default_memory_limit_gb() if max_memory_gb is None else max_memory_gb
    if not (isinstance(limit, (int, float)) and limit > 0 and math.isfinite(limit)):
        raise UserValueError(f"got {flag} {max_memory_gb}, expected a positive number of gigabytes")
    estimate = estimate_inference_bytes(model, height, width)
    if estimate > limit * 1e9:
        raise UserValueError(
            f"a {width}x{height} input needs about {estimate / 1e9:.1f} GB by our estimate, over the limit of "
            f"{limit:.1f} GB; use a smaller input size, or raise the limit with {flag}"
        )
    return estimate
