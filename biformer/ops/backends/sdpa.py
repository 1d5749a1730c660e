"""``sdpa``: routed K/V rows indexed straight from the image-order maps, then fused SDPA."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..compiled import routed_sdpa_op, use_compiled_ops
from ..gather import query_regions, regions_to_map, routed_key_valid, routed_rows
from ..kernel import attention, explicit_kernel_preferred
from ..nonfinite import nonfinite_guard
from ..regions import RegionGrid, Routing

NAME = "sdpa"


def sdpa_backend(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    """One ``index_select`` per K and V does both the region cut and the routing gather, and its
    backward is one index-add into an image-sized buffer. Every tensor handed to SDPA keeps a
    contiguous last dimension (SDPA's fast CPU kernel needs it).

    Under ``torch.compile`` on the CPU the same code runs as one opaque custom op
    (:func:`biformer.ops.compiled.routed_sdpa_op`): inductor's own lowering of it is slower.
    """
    grid = routing.grid
    # what the kernel may hide of reference's NaN/inf (see biformer.ops.nonfinite)
    term = nonfinite_guard(q, k, v, routing, num_heads, keep_inf_keys=True)
    zero_row = term is not None and grid.is_padded  # padded slots must read zeros, not a neighbour's NaN
    # the custom op is 2D only, and wraps SDPA's float32-speed kernel (low precision is faster traced)
    if use_compiled_ops(q) and not zero_row and grid.ndim == 2 and not explicit_kernel_preferred(q):
        out = routed_sdpa_op(q, k, v, routing, num_heads, scale)
        return out if term is None else out + term
    n = q.shape[0]
    p, t, topk, h = grid.num_regions, grid.region_tokens, routing.indices.shape[-1], num_heads
    rows = routed_rows(routing, n, zero_row=zero_row)  # (N*P*k*T,)

    def routed(x: Tensor) -> Tensor:  # (N, *size, C) -> (N*P, h, k*T, C/h)
        c = x.shape[-1]
        flat = x.reshape(n * grid.tokens, c)
        if zero_row:
            flat = torch.cat([flat, flat.new_zeros(1, c)])  # (N*tokens + 1, C)
        return flat.index_select(0, rows).view(n * p, topk * t, h, c // h).transpose(1, 2)

    mask = routed_key_valid(routing, q.device)
    if mask is not None:
        mask = mask.view(n * p, 1, 1, topk * t)
    out = attention(query_regions(q, grid, h), routed(k), routed(v), mask, scale)  # (N*P, h, T, dv)
    out = regions_to_map(out, grid, n)  # (N*P, h, T, dv) -> (N, *size, C_v)
    return out if term is None else out + term


def can_run(q: Optional[Tensor], k: Optional[Tensor], v: Optional[Tensor], grid: Optional[RegionGrid],
            topk: Optional[int], num_heads: Optional[int]) -> Optional[str]:
    return None  # SDPA has a kernel for every device, dtype and mode
