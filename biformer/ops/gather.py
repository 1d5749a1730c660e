"""Index helpers shared by the gather-based backends (reference, sdpa, matmul)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import regions
from .regions import RegionGrid, Routing


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


def routed_rows(routing: Routing, batch: int, zero_row: bool = False) -> Tensor:
    """``(N*P*k*T,)`` rows of the flattened ``(N*H*W, C)`` map holding each query region's routed keys.

    ``zero_row``: padded slots point at row ``N*H*W`` (a zero row the caller appends) instead of the
    nearest real token, so a NaN or inf there cannot leak through its zero weight or -inf mask.
    """
    grid = routing.grid
    device = routing.indices.device
    rows = region_token_index(grid, device)[routing.indices]  # (N, P, k, T)
    offsets = torch.arange(batch, device=device).view(batch, 1, 1, 1) * (grid.height * grid.width)
    rows = (rows + offsets).reshape(-1)
    if zero_row and grid.is_padded:
        slot_valid = grid.token_valid(device)[routing.indices].reshape(-1)  # (N*P*k*T,)
        rows = torch.where(slot_valid, rows, batch * grid.height * grid.width)
    return rows


def query_regions(q: Tensor, grid: RegionGrid, num_heads: int) -> Tensor:
    """``(N, H, W, C)`` -> ``(N*P, h, T, C/h)`` whose memory is ``(N*P, T, h, C/h)`` (last dim contiguous)."""
    n, c = q.shape[0], q.shape[-1]
    # regions.pad_map is looked up per call: a test swaps in a padder that writes garbage
    x = regions.pad_map(q, grid).reshape(n, grid.rows, grid.region_h, grid.cols, grid.region_w, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(n * grid.num_regions, grid.region_tokens, num_heads, c // num_heads)
    return x.transpose(1, 2)


def regions_to_map(out: Tensor, grid: RegionGrid, batch: int) -> Tensor:
    """``(N*P, h, T, d)`` laid out as ``(N*P, T, h, d)`` -> ``(N, H, W, h*d)``, padding cropped."""
    c = out.shape[1] * out.shape[3]
    out = out.transpose(1, 2).reshape(batch, grid.rows, grid.cols, grid.region_h, grid.region_w, c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, grid.padded_h, grid.padded_w, c)
    return out[:, : grid.height, : grid.width] if grid.is_padded else out
