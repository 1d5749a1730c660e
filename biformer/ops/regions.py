"""Region grids, padding and region-level routing for Bi-Level Routing Attention.

Layout conventions used throughout `biformer.ops`:

* maps are channels-last, ``(N, H, W, C)``, with heads packed in ``C`` as ``(heads, head_dim)``;
* a map cut into regions is ``(N, P, heads, T, head_dim)``, where ``P = rows * cols`` regions
  are numbered row-major and ``T = region_h * region_w`` tokens are row-major inside a region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IntOrPair = Union[int, Tuple[int, int]]


def _pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(value)
        if len(pair) != 2:
            raise ValueError(f"got {name}={value!r}, expected an int or a pair of ints")
    if any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"got {name}={value!r}, expected positive integers")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class RegionGrid:
    """How an ``height x width`` map is cut into ``rows x cols`` regions of ``region_h x region_w`` tokens.

    When the map is not a multiple of the region size it is padded at the bottom and right;
    padded tokens are masked out of routing and attention.
    """

    height: int
    width: int
    rows: int
    cols: int
    region_h: int
    region_w: int

    @classmethod
    def from_n_win(cls, height: int, width: int, n_win: IntOrPair) -> "RegionGrid":
        """``n_win`` regions per side, as in the original code; the region size is rounded up."""
        rows, cols = _pair(n_win, "n_win")
        _check_map(height, width)
        return cls(height, width, rows, cols, math.ceil(height / rows), math.ceil(width / cols))

    @classmethod
    def from_region_size(cls, height: int, width: int, region_size: IntOrPair) -> "RegionGrid":
        """Regions of ``region_size`` tokens per side; the number of regions is rounded up."""
        region_h, region_w = _pair(region_size, "region_size")
        _check_map(height, width)
        return cls(height, width, math.ceil(height / region_h), math.ceil(width / region_w), region_h, region_w)

    @property
    def num_regions(self) -> int:
        return self.rows * self.cols

    @property
    def region_tokens(self) -> int:
        return self.region_h * self.region_w

    @property
    def padded_h(self) -> int:
        return self.rows * self.region_h

    @property
    def padded_w(self) -> int:
        return self.cols * self.region_w

    @property
    def is_padded(self) -> bool:
        return self.padded_h != self.height or self.padded_w != self.width

    def token_valid(self, device: Optional[torch.device] = None) -> Tensor:
        """``(P, T)`` bool: which tokens of each region are real (not padding)."""
        ys = torch.arange(self.padded_h, device=device) < self.height
        xs = torch.arange(self.padded_w, device=device) < self.width
        valid = ys[:, None] & xs[None, :]  # (Hp, Wp)
        valid = valid.view(self.rows, self.region_h, self.cols, self.region_w).permute(0, 2, 1, 3)
        return valid.reshape(self.num_regions, self.region_tokens)

    def region_token_counts(self, device: Optional[torch.device] = None) -> Tensor:
        """``(P,)`` number of real tokens in each region (0 for regions made only of padding)."""
        return self.token_valid(device).sum(-1)


def _check_map(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"got an empty spatial size {height}x{width}; expected H >= 1 and W >= 1")


def resolve_grid(
    height: int,
    width: int,
    n_win: Optional[IntOrPair] = None,
    region_size: Optional[IntOrPair] = None,
) -> RegionGrid:
    """A grid from exactly one of ``n_win`` (regions per side) or ``region_size`` (tokens per side)."""
    if (n_win is None) == (region_size is None):
        raise ValueError(
            f"got n_win={n_win!r} and region_size={region_size!r}; give exactly one of them"
        )
    if n_win is not None:
        return RegionGrid.from_n_win(height, width, n_win)
    return RegionGrid.from_region_size(height, width, region_size)  # type: ignore[arg-type]


def pad_map(x: Tensor, grid: RegionGrid) -> Tensor:
    """Zero-pad an ``(N, H, W, C)`` map to the grid's padded size (bottom and right)."""
    if not grid.is_padded:
        return x
    return F.pad(x, (0, 0, 0, grid.padded_w - grid.width, 0, grid.padded_h - grid.height))


def to_regions(x: Tensor, grid: RegionGrid, num_heads: int) -> Tensor:
    """``(N, H, W, heads*d)`` -> ``(N, P, heads, T, d)``, padded; always a fresh contiguous tensor."""
    n, _, _, c = x.shape
    x = pad_map(x, grid)
    x = x.reshape(n, grid.rows, grid.region_h, grid.cols, grid.region_w, num_heads, c // num_heads)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (N, rows, cols, heads, region_h, region_w, d)
    return x.reshape(n, grid.num_regions, num_heads, grid.region_tokens, c // num_heads)


def from_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """``(N, P, heads, T, d)`` -> ``(N, H, W, heads*d)``, with the padding cropped away."""
    n, _, heads, _, d = x.shape
    x = x.view(n, grid.rows, grid.cols, heads, grid.region_h, grid.region_w, d)
    x = x.permute(0, 1, 4, 2, 5, 3, 6)  # (N, rows, region_h, cols, region_w, heads, d)
    x = x.reshape(n, grid.padded_h, grid.padded_w, heads * d)
    if grid.is_padded:
        x = x[:, : grid.height, : grid.width]
    return x


def region_means(x: Tensor, grid: RegionGrid) -> Tensor:
    """Mean of each region's real tokens: ``(N, H, W, C)`` -> ``(N, P, C)``.

    Regions made only of padding get a zero descriptor; routing masks them out anyway.
    Sums accumulate and return in float32 whatever the input dtype (routing is decided in fp32).
    Sums run in two passes (within region rows, then over them): one reduction over two
    non-adjacent dims of a strided slice is several times slower on the CPU.
    """
    n, _, _, c = x.shape
    x = pad_map(x, grid)
    if grid.is_padded:
        valid = grid.token_valid(x.device)  # (P, T)
        valid = valid.view(grid.rows, grid.cols, grid.region_h, grid.region_w).permute(0, 2, 1, 3)
        valid = valid.reshape(grid.padded_h, grid.padded_w, 1)
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    row_sums = x.reshape(n, grid.padded_h, grid.cols, grid.region_w, c).sum(3, dtype=torch.float32)  # (N, Hp, cols, C)
    sums = row_sums.view(n, grid.rows, grid.region_h, grid.cols, c).sum(2)  # (N, rows, cols, C)
    if not grid.is_padded:
        return sums.reshape(n, grid.num_regions, c) / grid.region_tokens
    counts = grid.region_token_counts(x.device).clamp(min=1).to(torch.float32)  # (P,)
    return sums.reshape(n, grid.num_regions, c) / counts[:, None]


class Routing(NamedTuple):
    """Where every query region routes to.

    ``indices``: ``(N, P, topk)`` routed key regions, best first (row-major region numbers).
    ``scores``: ``(N, P, topk)`` their routing logits ``scale * q_region . k_region``.
    ``grid``: the region grid these refer to.
    """

    indices: Tensor
    scores: Tensor
    grid: RegionGrid


@torch.no_grad()
def route(q: Tensor, k: Tensor, grid: RegionGrid, topk: int, scale: float) -> Routing:
    """Region-to-region routing: top-k key regions per query region, by region-mean affinity.

    ``q`` and ``k`` are ``(N, H, W, C_qk)`` maps. Routing carries no gradient, as in the original.
    Regions made only of padding are never routed to.

    Low precision: region means and routing logits are computed in float32 (also under autocast), so
    bf16/fp16 ``q`` and ``k`` route exactly as their values upcast to float32 would; ``scores`` are
    float32. Against a float32 model the routed set can differ only where the float32 logits of the
    k-th and (k+1)-th regions are closer than the low-precision rounding of ``q``/``k`` moves them.
    """
    q_region = region_means(q, grid)  # (N, P, C), float32
    k_region = region_means(k, grid)
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            logits = (q_region * scale) @ k_region.transpose(-1, -2)  # (N, P, P)
    else:
        logits = (q_region * scale) @ k_region.transpose(-1, -2)
    if grid.is_padded:
        has_tokens = grid.region_token_counts(q.device) > 0
        logits = logits.masked_fill(~has_tokens, float("-inf"))
    scores, indices = torch.topk(logits, k=topk, dim=-1)
    return Routing(indices, scores, grid)
