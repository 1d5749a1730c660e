"""The routing rule, written once, and the index maps it is evaluated over.

Query token ``i`` may attend key token ``j`` iff ``j``'s region is one of the regions that ``i``'s
region routes to, and ``j`` is a real (unpadded) token. :func:`routing_mask_mod` states that rule
as a FlexAttention ``mask_mod``; every mask in :mod:`biformer.ops` is derived from it:

* the dense backend's ``(N, 1, HW, HW)`` token mask (:func:`dense_token_mask`): the rule evaluated
  over row-major image tokens, and the same as an additive bias gathered from the region table
  (:func:`dense_token_bias`, what the backend runs);
* the flex backend's ``BlockMask`` (:func:`biformer.ops.backends.flex.routing_block_mask`): the rule
  over region-major tokens, whose block indices are the routed regions.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .regions import RegionGrid, Routing

# (batch, head, query token, key token) -> may attend; the FlexAttention mask_mod signature
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def region_table(routing: Routing) -> Tensor:
    """``(N, P, P)`` bool: query region ``p`` routes to key region ``r``."""
    n, p, _ = routing.indices.shape
    allowed = torch.zeros(n, p, p, dtype=torch.bool, device=routing.indices.device)
    return allowed.scatter_(2, routing.indices, True)


def routing_mask_mod(
    allowed: Tensor, query_region: Tensor, key_region: Tensor, key_valid: Optional[Tensor]
) -> MaskMod:
    """The rule over some token order.

    ``allowed``: :func:`region_table`; ``query_region`` / ``key_region``: region of every query / key
    token in this order; ``key_valid``: which key tokens are real (None when all are).
    """

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        routed = allowed[b, query_region[q_idx], key_region[kv_idx]]
        return routed if key_valid is None else routed & key_valid[kv_idx]

    return mask_mod


def token_region(grid: RegionGrid, device: Optional[torch.device] = None) -> Tensor:
    """``(tokens,)`` region number of every real token, row-major (``H*W`` or ``D*H*W`` tokens)."""
    region = torch.zeros((1,) * grid.ndim, dtype=torch.long, device=device)
    for axis, (s, r, c) in enumerate(zip(grid.size, grid.region, grid.counts)):
        shape = [1] * grid.ndim
        shape[axis] = s
        region = region * c + (torch.arange(s, device=device) // r).view(shape)  # (*size) after the loop
    return region.reshape(-1)


def image_order_mask_mod(routing: Routing) -> MaskMod:
    """The rule over the real tokens of the unpadded map, row-major (every token is real)."""
    region = token_region(routing.grid, routing.indices.device)
    return routing_mask_mod(region_table(routing), region, region, None)


def region_major_mask_mod(routing: Routing) -> MaskMod:
    """The rule over the padded map's tokens in region-major order (region ``p`` is tokens ``p*T .. p*T+T-1``)."""
    grid = routing.grid
    device = routing.indices.device
    region = torch.arange(grid.num_regions, device=device).repeat_interleave(grid.region_tokens)  # (P*T,)
    key_valid = grid.token_valid(device).reshape(-1) if grid.is_padded else None
    return routing_mask_mod(region_table(routing), region, region, key_valid)


def evaluate_mask_mod(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """``(N, 1, q_len, kv_len)`` bool: ``mask_mod`` on every (query, key) pair, by broadcast indexing."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.zeros((), dtype=torch.long, device=device)
    q_idx = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    return mask_mod(b, h, q_idx, kv_idx)


def dense_token_mask(routing: Routing) -> Tensor:
    """``(N, 1, tokens, tokens)`` bool over row-major image tokens: the rule, materialised."""
    tokens = routing.grid.tokens
    n = routing.indices.shape[0]
    return evaluate_mask_mod(image_order_mask_mod(routing), n, tokens, tokens, routing.indices.device)


def dense_token_bias(routing: Routing, dtype: torch.dtype) -> Tensor:
    """``(N, 1, tokens, tokens)``: 0 where :func:`dense_token_mask` allows, -inf elsewhere.

    The rule written as two row/column gathers of the ``(N, P, P)`` region table rather than an
    elementwise 3-index lookup: in ONNX Runtime that is two ``Gather`` ops instead of a ``GatherND``,
    and an additive mask needs no ``Where`` on the ``(N, heads, HW, HW)`` scores.
    """
    region = token_region(routing.grid, routing.indices.device)  # (tokens,)
    allowed = region_table(routing)  # (N, P, P)
    table = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return table.index_select(1, region).index_select(2, region).unsqueeze(1)
