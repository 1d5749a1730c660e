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
* ``"flex"``: compiled FlexAttention with a BlockMask built from the routed regions (GPU training
  and inference; CPU inference only). Never chosen by ``"auto"``; see :mod:`biformer.ops.flex`.
* ``"auto"``: picks ``"sdpa"`` or ``"dense"`` per call from a cost estimate (see :func:`select_backend`).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import regions
from .errors import BackendUnavailable
from .flex import flex_backend
from .nonfinite import may_be_nonfinite, nonfinite_term, sanitise
from .regions import IntOrPair, RegionGrid, Routing, from_regions, resolve_grid, route, to_regions

__all__ = [
    "bi_level_routing_attention",
    "routed_attention_weights",
    "select_backend",
    "available_backends",
    "BackendUnavailable",
]


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


def region_token_index(grid: RegionGrid, device: Optional[torch.device] = None) -> Tensor:
    """``(P, T)`` flat ``y * W + x`` index of every region slot in the unpadded map.

    Padding slots point at the nearest real token (any real row would do: they are masked out).
    """
    ys = torch.arange(grid.padded_h, device=device).clamp(max=grid.height - 1)
    xs = torch.arange(grid.padded_w, device=device).clamp(max=grid.width - 1)
    index = ys[:, None] * grid.width + xs[None, :]  # (Hp, Wp)
    index = index.view(grid.rows, grid.region_h, grid.cols, grid.region_w).permute(0, 2, 1, 3)
    return index.reshape(grid.num_regions, grid.region_tokens)


def token_region(grid: RegionGrid, device: Optional[torch.device] = None) -> Tensor:
    """``(H*W,)`` region number of every real token, row-major."""
    ys = torch.arange(grid.height, device=device) // grid.region_h
    xs = torch.arange(grid.width, device=device) // grid.region_w
    return (ys[:, None] * grid.cols + xs[None, :]).reshape(-1)


def _routed_logits(qr: Tensor, kr: Tensor, routing: Routing, scale: float) -> Tensor:
    k_sel = gather_routed(kr, routing.indices)  # (N, P, h, kT, dq)
    logits = (qr * scale) @ k_sel.transpose(-1, -2)  # (N, P, h, T, kT)
    key_valid = routed_key_valid(routing, qr.device)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, :, None, None, :], float("-inf"))
    return logits


# --------------------------------------------------------------------------------------------
# backends: each maps channels-last (q, k, v), a routing, heads and scale to (N, H, W, C_v)


def _reference(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    """Cut into regions, gather the routed regions, explicit softmax."""
    grid = routing.grid
    qr, kr, vr = (to_regions(t, grid, num_heads) for t in (q, k, v))  # (N, P, h, T, d)
    weights = _routed_logits(qr, kr, routing, scale).softmax(dim=-1)  # (N, P, h, T, kT)
    v_sel = gather_routed(vr, routing.indices)  # (N, P, h, kT, dv)
    return from_regions(weights @ v_sel, grid)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    """Routed tokens gathered straight from the image-order maps, then fused attention.

    One ``index_select`` per K and V does both the region cut and the routing gather, and its
    backward is one index-add into an image-sized buffer. Every tensor handed to SDPA keeps a
    contiguous last dimension (SDPA's fast CPU kernel needs it).
    """
    grid = routing.grid
    n, height, width, c_qk = q.shape
    c_v = v.shape[-1]
    p, t, topk = grid.num_regions, grid.region_tokens, routing.indices.shape[-1]
    h = num_heads
    # what a kernel may hide of reference's NaN/inf (see biformer.ops.nonfinite)
    term = nonfinite_term(q, k, v, routing, num_heads, keep_inf_keys=True) if may_be_nonfinite(q, k, v) else None

    rows = region_token_index(grid, q.device)[routing.indices]  # (N, P, k, T)
    rows = (rows + torch.arange(n, device=q.device).view(n, 1, 1, 1) * (height * width)).reshape(-1)
    if grid.is_padded:  # padded slots read an appended zero row: an inf key would leak through the mask
        slot_valid = grid.token_valid(q.device)[routing.indices].reshape(-1)  # (N*P*k*T,)
        rows = torch.where(slot_valid, rows, n * height * width)

    def routed(x: Tensor) -> Tensor:  # (N, H, W, C) -> (N*P, h, k*T, C/h)
        c = x.shape[-1]
        flat = x.reshape(n * height * width, c)
        if grid.is_padded:
            flat = torch.cat([flat, flat.new_zeros(1, c)])  # (N*H*W + 1, C)
        return flat.index_select(0, rows).view(n * p, topk * t, h, c // h).transpose(1, 2)

    q_regions = regions.pad_map(q, grid).reshape(n, grid.rows, grid.region_h, grid.cols, grid.region_w, c_qk)
    q_regions = q_regions.permute(0, 1, 3, 2, 4, 5).reshape(n * p, t, h, c_qk // h).transpose(1, 2)  # (N*P, h, T, dq)
    mask = routed_key_valid(routing, q.device)
    if mask is not None:
        mask = mask.view(n * p, 1, 1, topk * t)
    out = F.scaled_dot_product_attention(q_regions, routed(k), routed(v), attn_mask=mask, scale=scale)
    # out: (N*P, h, T, dv), laid out in memory as (N*P, T, h, dv) because q was
    out = out.transpose(1, 2).reshape(n, grid.rows, grid.cols, grid.region_h, grid.region_w, c_v)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(n, grid.padded_h, grid.padded_w, c_v)
    out = out[:, :height, :width] if grid.is_padded else out
    return out if term is None else out + term


def dense_routing_mask(routing: Routing) -> Tensor:
    """``(N, 1, H*W, H*W)`` bool: real token i may attend real token j (row-major token order)."""
    grid = routing.grid
    n, p, _ = routing.indices.shape
    allowed = torch.zeros(n, p, p, dtype=torch.bool, device=routing.indices.device)
    allowed.scatter_(2, routing.indices, True)  # (N, query region, key region)
    region = token_region(grid, allowed.device)  # (HW,)
    return allowed[:, region][:, :, region].unsqueeze(1)


def _dense(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    """Attention over the whole (unpadded) map, with the routing as a token mask. No copies, no padding."""
    n, height, width, _ = q.shape
    h = num_heads
    # the mask is added to every logit of the map, so no non-finite key may reach the kernel
    term = None
    if may_be_nonfinite(q, k, v):
        term = nonfinite_term(q, k, v, routing, num_heads, keep_inf_keys=False)
        q, k, v = sanitise(q), sanitise(k), sanitise(v)

    def heads(x: Tensor) -> Tensor:  # (N, H, W, C) -> (N, h, HW, C/h), a view
        return x.reshape(n, height * width, h, x.shape[-1] // h).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=dense_routing_mask(routing), scale=scale)
    out = out.transpose(1, 2).reshape(n, height, width, v.shape[-1])  # (N, h, HW, dv) -> (N, H, W, C_v)
    return out if term is None else out + term


Backend = Callable[[Tensor, Tensor, Tensor, Routing, int, float], Tensor]
_BACKENDS: Dict[str, Backend] = {"reference": _reference, "sdpa": _sdpa, "dense": _dense, "flex": flex_backend}


def available_backends() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def select_backend(grid: RegionGrid, topk: int) -> str:
    """The cheaper of the routed (gather + SDPA) and dense-masked paths, by a simple cost model.

    Dense attention does ``P/topk`` times the routed path's multiply-adds but needs no gather, no
    copies and runs as one large kernel. It wins when regions are tiny (a few tokens each, where the
    routed path is dominated by per-region overhead) and ``topk`` is a large share of the regions.
    """
    if not isinstance(grid.height * grid.width, int):
        return "sdpa"  # symbolic sizes (torch.export with dynamic H, W): one path for every size
    tokens = grid.height * grid.width
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
    out = _BACKENDS[backend](q, k, v, routing, num_heads, scale)  # (N, H, W, C_v)
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
    return _routed_logits(qr, kr, routing, scale).softmax(dim=-1)
