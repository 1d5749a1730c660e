"""Bi-Level Routing Attention as a functional op, with interchangeable backends.

``bi_level_routing_attention(q, k, v, ...)`` takes channels-last maps ``(N, H, W, C)``:

1. the map is cut into regions (``n_win`` per side, or ``region_size`` tokens per side),
   padding the bottom/right when it does not divide;
2. each query region routes to the ``topk`` key regions with the highest region-mean affinity
   ``scale * mean(q) . mean(k)`` (no gradient flows through this choice);
3. each query token attends to the tokens of its region's routed regions.

Padded tokens get exactly zero weight in both steps and are cropped from the output.

Backends (``backend=``):

* ``"reference"``: readable gather + explicit softmax; the ground truth for the others.
* ``"sdpa"``: the same gather, then ``F.scaled_dot_product_attention`` (no attention matrix kept).
* ``"dense"``: attention over the whole map with routing expressed as a mask; cheaper when regions
  are tiny and ``topk`` is a large share of them.
* ``"auto"``: picks per call from a cost estimate (see :func:`select_backend`).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .regions import IntOrPair, RegionGrid, Routing, from_regions, resolve_grid, route, to_regions

__all__ = [
    "bi_level_routing_attention",
    "routed_attention_weights",
    "select_backend",
    "available_backends",
    "BackendUnavailable",
]


class BackendUnavailable(ValueError):
    """A backend was asked for explicitly but cannot take this input; the message says why."""


# --------------------------------------------------------------------------------------------
# shared pieces


def gather_routed(x: Tensor, indices: Tensor) -> Tensor:
    """Rows of the routed regions: ``(N, P, h, T, d)`` by ``(N, P, k)`` -> ``(N, P, h, k*T, d)``.

    Indexes rows of the flattened ``(N*P, ...)`` tensor, so the backward is an index-add into a
    buffer the size of ``x`` (the original gathered from an ``expand()``-ed view ``P`` times larger).
    """
    n, p, h, t, d = x.shape
    topk = indices.shape[-1]
    offsets = torch.arange(n, device=indices.device).view(n, 1, 1) * p
    rows = (indices + offsets).reshape(-1)  # (N*P*k,)
    picked = x.reshape(n * p, h, t, d).index_select(0, rows)  # (N*P*k, h, T, d)
    picked = picked.view(n, p, topk, h, t, d).transpose(2, 3)  # (N, P, h, k, T, d)
    return picked.reshape(n, p, h, topk * t, d)


def routed_key_valid(routing: Routing, device: torch.device) -> Optional[Tensor]:
    """``(N, P, k*T)`` bool mask of real (unpadded) routed key tokens, or None when nothing is padded."""
    grid = routing.grid
    if not grid.is_padded:
        return None
    valid = grid.token_valid(device)  # (P, T)
    n, p, topk = routing.indices.shape
    return valid[routing.indices].view(n, p, topk * grid.region_tokens)


def _routed_logits(qr: Tensor, kr: Tensor, routing: Routing, scale: float) -> Tuple[Tensor, Tensor]:
    k_sel = gather_routed(kr, routing.indices)  # (N, P, h, kT, dq)
    logits = (qr * scale) @ k_sel.transpose(-1, -2)  # (N, P, h, T, kT)
    key_valid = routed_key_valid(routing, qr.device)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, :, None, None, :], float("-inf"))
    return logits, k_sel


# --------------------------------------------------------------------------------------------
# backends: each maps (qr, kr, vr, routing, scale) -> (N, P, h, T, dv), in region layout


def _reference(qr: Tensor, kr: Tensor, vr: Tensor, routing: Routing, scale: float) -> Tensor:
    logits, _ = _routed_logits(qr, kr, routing, scale)
    weights = logits.softmax(dim=-1)
    v_sel = gather_routed(vr, routing.indices)  # (N, P, h, kT, dv)
    return weights @ v_sel


def _sdpa(qr: Tensor, kr: Tensor, vr: Tensor, routing: Routing, scale: float) -> Tensor:
    n, p, h, t, dq = qr.shape
    k_sel = gather_routed(kr, routing.indices).flatten(0, 1)  # (N*P, h, kT, dq)
    v_sel = gather_routed(vr, routing.indices).flatten(0, 1)  # (N*P, h, kT, dv)
    mask = routed_key_valid(routing, qr.device)
    if mask is not None:
        mask = mask.view(n * p, 1, 1, -1)
    out = F.scaled_dot_product_attention(qr.flatten(0, 1), k_sel, v_sel, attn_mask=mask, scale=scale)
    return out.view(n, p, h, t, -1)


def dense_routing_mask(routing: Routing) -> Tensor:
    """``(N, 1, P*T, P*T)`` bool: token i may attend token j (region-major token order)."""
    grid = routing.grid
    n, p, _ = routing.indices.shape
    t = grid.region_tokens
    allowed = torch.zeros(n, p, p, dtype=torch.bool, device=routing.indices.device)
    allowed.scatter_(2, routing.indices, True)  # (N, P query regions, P key regions)
    mask = allowed[:, :, None, :, None].expand(n, p, t, p, t)
    if grid.is_padded:
        mask = mask & grid.token_valid(allowed.device)[None, None, None]
    return mask.reshape(n, 1, p * t, p * t)


def _dense(qr: Tensor, kr: Tensor, vr: Tensor, routing: Routing, scale: float) -> Tensor:
    n, p, h, t, _ = qr.shape

    def flat(x: Tensor) -> Tensor:  # (N, P, h, T, d) -> (N, h, P*T, d)
        return x.transpose(1, 2).reshape(n, h, p * t, x.shape[-1])

    out = F.scaled_dot_product_attention(
        flat(qr), flat(kr), flat(vr), attn_mask=dense_routing_mask(routing), scale=scale
    )  # (N, h, P*T, dv)
    return out.view(n, h, p, t, -1).transpose(1, 2)


Backend = Callable[[Tensor, Tensor, Tensor, Routing, float], Tensor]
_BACKENDS: Dict[str, Backend] = {"reference": _reference, "sdpa": _sdpa, "dense": _dense}


def available_backends() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def select_backend(grid: RegionGrid, topk: int) -> str:
    """The cheaper of the routed (gather + SDPA) and dense-masked paths, by a simple cost model.

    Dense attention does ``P/topk`` times the routed path's multiply-adds but needs no gather and
    runs as one large kernel. It wins when regions are tiny (a few tokens each, where the routed
    path is dominated by per-region overhead) and ``topk`` is a large share of the regions.
    """
    tokens = grid.num_regions * grid.region_tokens
    dense_cost = tokens * tokens
    # each routed region pays a fixed overhead worth roughly 64 tokens of attention work
    routed_cost = grid.num_regions * (grid.region_tokens + 64) * topk * grid.region_tokens
    if tokens <= 1024 and dense_cost <= routed_cost:
        return "dense"
    return "sdpa"


# --------------------------------------------------------------------------------------------
# the op


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"expected {name} of shape (N, H, W, C), got a {t.dim()}-D tensor of shape {tuple(t.shape)}"
            )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must share q's (N, H, W), got q {tuple(q.shape)} and v {tuple(v.shape)}"
        )
    if num_heads < 1 or q.shape[-1] % num_heads or v.shape[-1] % num_heads:
        raise ValueError(
            f"got num_heads={num_heads}, which must divide the q/k width {q.shape[-1]} and the v width {v.shape[-1]}"
        )


def bi_level_routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_heads: int,
    topk: int,
    n_win: Optional[IntOrPair] = None,
    region_size: Optional[IntOrPair] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_routing: bool = False,
) -> Union[Tensor, Tuple[Tensor, Routing]]:
    """Bi-Level Routing Attention on channels-last maps.

    Args:
        q, k: ``(N, H, W, C_qk)``; ``v``: ``(N, H, W, C_v)``. Heads are packed in the channel
            dimension as ``(num_heads, head_dim)``.
        num_heads: attention heads; routing is shared by all heads.
        topk: key regions each query region attends to.
        n_win / region_size: the region grid, as regions per side or tokens per side (exactly one).
        scale: logit scale for routing and attention; defaults to ``C_qk ** -0.5`` (the whole
            q/k width, as in the original BiFormer, whose checkpoints depend on it).
        backend: ``"auto"``, or one of :func:`available_backends`.
        return_routing: also return the :class:`Routing` (region indices and scores).

    Returns:
        ``(N, H, W, C_v)``, and the routing when asked for.
    """
    _check_inputs(q, k, v, num_heads)
    n, height, width, c_qk = q.shape
    grid = resolve_grid(height, width, n_win=n_win, region_size=region_size)
    if not 1 <= topk <= grid.num_regions:
        raise ValueError(
            f"got topk={topk} but the map has only {grid.num_regions} regions "
            f"({grid.rows}x{grid.cols} for a {height}x{width} map); expected 1 <= topk <= {grid.num_regions}"
        )
    if scale is None:
        scale = c_qk ** -0.5
    if backend == "auto":
        backend = select_backend(grid, topk)
    elif backend not in _BACKENDS:
        raise BackendUnavailable(f"got backend={backend!r}, expected 'auto' or one of {available_backends()}")

    routing = route(q, k, grid, topk, scale)
    qr = to_regions(q, grid, num_heads)  # (N, P, h, T, dq)
    kr = to_regions(k, grid, num_heads)
    vr = to_regions(v, grid, num_heads)  # (N, P, h, T, dv)
    out = from_regions(_BACKENDS[backend](qr, kr, vr, routing, scale), grid)  # (N, H, W, C_v)
    return (out, routing) if return_routing else out


def routed_attention_weights(
    q: Tensor, k: Tensor, routing: Routing, *, num_heads: int, scale: Optional[float] = None
) -> Tensor:
    """Token attention probabilities ``(N, P, heads, T, topk*T)`` for a given routing.

    Key tokens are ordered as the routed regions (best first), row-major inside each region.
    Padded keys have weight exactly zero. For visualisation; the backends never materialise this.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qr = to_regions(q, routing.grid, num_heads)
    kr = to_regions(k, routing.grid, num_heads)
    logits, _ = _routed_logits(qr, kr, routing, scale)
    return logits.softmax(dim=-1)
