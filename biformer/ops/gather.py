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
    """``(P, T)`` flat row-major index (``y * W + x``, 3D ``(z * H + y) * W + x``) of every region
    slot in the unpadded map.

    Padding slots point at the nearest real token (any real row would do: they are masked out).
    """
    index = torch.zeros((1,) * grid.ndim, dtype=torch.long, device=device)
    for axis, (p, s) in enumerate(zip(grid.padded, grid.size)):
        shape = [1] * grid.ndim
        shape[axis] = p
        index = index * s + torch.arange(p, device=device).clamp(max=s - 1).view(shape)  # (*padded) after the loop
    return grid.region_table(index)


def routed_rows(routing: Routing, batch: int, zero_row: bool = False) -> Tensor:
    """``(N*P*k*T,)`` rows of the flattened ``(N*tokens, C)`` map holding each query region's routed keys.

    ``zero_row``: padded slots point at row ``N*tokens`` (a zero row the caller appends) instead of the
    nearest real token, so a NaN or inf there cannot leak through its zero weight or -inf mask.
    """
    grid = routing.grid
    device = routing.indices.device
    rows = region_token_index(grid, device)[routing.indices]  # (N, P, k, T)
    offsets = torch.arange(batch, device=device).view(batch, 1, 1, 1) * grid.tokens
    rows = (rows + offsets).reshape(-1)
    if zero_row and grid.is_padded:
        slot_valid = grid.token_valid(device)[routing.indices].reshape(-1)  # (N*P*k*T,)
        rows = torch.where(slot_valid, rows, batch * grid.tokens)
    return rows


def query_regions(q: Tensor, grid: RegionGrid, num_heads: int) -> Tensor:
    """``(N, *size, C)`` -> ``(N*P, h, T, C/h)`` whose memory is ``(N*P, T, h, C/h)`` (last dim contiguous)."""
    n, c, k = q.shape[0], q.shape[-1], grid.ndim
    # regions.pad_map is looked up per call: a test swaps in a padder that writes garbage
    x = regions.pad_map(q, grid).reshape(n, *regions._interleave(grid.counts, grid.region), c)
    x = x.permute(0, *range(1, 2 * k + 1, 2), *range(2, 2 * k + 1, 2), 2 * k + 1)  # (N, c1..ck, r1..rk, C)
    x = x.reshape(n * grid.num_regions, grid.region_tokens, num_heads, c // num_heads)
    return x.transpose(1, 2)


def regions_to_map(out: Tensor, grid: RegionGrid, batch: int) -> Tensor:
    """``(N*P, h, T, d)`` laid out as ``(N*P, T, h, d)`` -> ``(N, *size, h*d)``, padding cropped."""
    c, k = out.shape[1] * out.shape[3], grid.ndim
    out = out.transpose(1, 2).reshape(batch, *grid.counts, *grid.region, c)
    out = out.permute(0, *(a for i in range(k) for a in (1 + i, 1 + k + i)), 2 * k + 1)  # (N, c1, r1, .., C)
    return regions.crop_map(out.reshape(batch, *grid.padded, c), grid)
