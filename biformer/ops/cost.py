"""The cost model behind ``backend="auto"``: routed (gather + attention per region) or dense-masked.

Costs are in "token-pair units" (one query token against one key token, all heads and channels):

* dense: ``(H*W)**2``, one large masked kernel, no copies;
* routed: ``P * topk * T * (T + ROUTED_REGION_OVERHEAD_TOKENS)``: the useful ``P * T * topk*T`` pairs,
  plus a fixed overhead per routed region (gather, the small per-region kernels' setup) worth
  ``ROUTED_REGION_OVERHEAD_TOKENS`` query tokens.

Dense is chosen when it costs no more than routed and the map has at most ``DENSE_MAX_TOKENS``
tokens (beyond that its ``(N, 1, HW, HW)`` mask and score matrix grow quadratically in memory).

The constants are measured by :mod:`biformer.ops.calibrate`; see its docstring for the figures.
"""
from __future__ import annotations

from .regions import RegionGrid

# Measured (biformer.ops.calibrate, 2 threads, fp32, CPU): see that module's docstring.
ROUTED_REGION_OVERHEAD_TOKENS = 64
# Largest map dense may take: 32x32 tokens, i.e. a 1M-entry mask per image.
DENSE_MAX_TOKENS = 1024


def dense_cost(grid: RegionGrid) -> int:
    tokens = grid.tokens
    return tokens * tokens


def routed_cost(grid: RegionGrid, topk: int, overhead_tokens: int = ROUTED_REGION_OVERHEAD_TOKENS) -> int:
    t = grid.region_tokens
    return grid.num_regions * topk * t * (t + overhead_tokens)


def prefer_dense(grid: RegionGrid, topk: int) -> bool:
    """Whether dense is cheaper than routed for this grid and topk (static sizes only)."""
    tokens = grid.tokens
    return tokens <= DENSE_MAX_TOKENS and dense_cost(grid) <= routed_cost(grid, topk)
