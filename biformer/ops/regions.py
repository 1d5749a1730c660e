"""Region grids, padding and region-level routing for Bi-Level Routing Attention.

Layout conventions used throughout `biformer.ops`:

* maps are channels-last, ``(N, H, W, C)`` (2D) or ``(N, D, H, W, C)`` (3D), with heads packed in
  ``C`` as ``(heads, head_dim)``;
* a map cut into regions is ``(N, P, heads, T, head_dim)``, where ``P = rows * cols`` (3D:
  ``planes * rows * cols``) regions are numbered row-major and ``T = region_h * region_w`` (3D:
  ``region_d * region_h * region_w``) tokens are row-major inside a region.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IntOrPair = Union[int, Tuple[int, int]]
IntOrTriple = Union[int, Tuple[int, int, int]]


def _tuple(value: Union[int, Sequence[int]], length: int, name: str) -> Tuple[int, ...]:
    """``value`` as ``length`` positive ints; an int is broadcast to every dimension."""
    if isinstance(value, int):
        items: Tuple[int, ...] = (value,) * length
    else:
        items = tuple(value)
        if len(items) != length:
            kind = "a pair" if length == 2 else f"{length}"
            raise ValueError(f"got {name}={value!r}, expected an int or {kind} of ints")
    if any(not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"got {name}={value!r}, expected positive integers")
    return items


def _pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    return _tuple(value, 2, name)  # type: ignore[return-value]


def _product(values: Sequence) -> int:
    # not math.prod: sizes may be SymInts under torch.export
    return functools.reduce(operator.mul, values, 1)


def _interleave(counts: Sequence[int], region: Sequence[int]) -> Tuple[int, ...]:
    """``(c1, r1, c2, r2, ...)``: the shape that cuts a padded map into regions, one (count, size) pair per dim."""
    return tuple(v for pair in zip(counts, region) for v in pair)


@dataclass(frozen=True)
class RegionGrid:
    """How a ``height x width`` (or ``depth x height x width``) map is cut into regions.

    2D: ``rows x cols`` regions of ``region_h x region_w`` tokens, for ``(N, H, W, C)`` maps.
    3D (``ndim=3``): ``planes x rows x cols`` regions of ``region_d x region_h x region_w`` tokens,
    for ``(N, D, H, W, C)`` maps. A 2D grid is the 3D one with ``depth = planes = region_d = 1``
    and the depth axis dropped; every function here works on either through :attr:`size`,
    :attr:`counts` and :attr:`region`. Regions are numbered row-major (plane, row, col), and tokens
    row-major inside a region.

    When the map is not a multiple of the region size it is padded at the end of every axis;
    padded tokens are masked out of routing and attention.
    """

    height: int
    width: int
    rows: int
    cols: int
    region_h: int
    region_w: int
    depth: int = 1
    planes: int = 1
    region_d: int = 1
    ndim: int = 2  # spatial dims of the maps cut by this grid: 2 (N, H, W, C) or 3 (N, D, H, W, C)

    @classmethod
    def from_n_win(cls, height: int, width: int, n_win: IntOrPair) -> "RegionGrid":
        """``n_win`` regions per side, as in the original code; the region size is rounded up."""
        return cls.nd_from_n_win((height, width), n_win)

    @classmethod
    def from_region_size(cls, height: int, width: int, region_size: IntOrPair) -> "RegionGrid":
        """Regions of ``region_size`` tokens per side; the number of regions is rounded up."""
        return cls.nd_from_region_size((height, width), region_size)

    @classmethod
    def nd(cls, size: Sequence[int], counts: Sequence[int], region: Sequence[int]) -> "RegionGrid":
        """A 2D or 3D grid from per-axis map sizes, region counts and region sizes (outermost axis first)."""
        if not len(size) == len(counts) == len(region) or len(size) not in (2, 3):
            raise ValueError(f"got size={size!r}, counts={counts!r}, region={region!r}; expected 2 or 3 values each")
        if len(size) == 2:
            return cls(size[0], size[1], counts[0], counts[1], region[0], region[1])
        return cls(size[1], size[2], counts[1], counts[2], region[1], region[2],
                   depth=size[0], planes=counts[0], region_d=region[0], ndim=3)

    @classmethod
    def nd_from_n_win(cls, size: Sequence[int], n_win: Union[int, Sequence[int]]) -> "RegionGrid":
        counts = _tuple(n_win, len(size), "n_win")  # type: ignore[arg-type]
        _check_map(size)
        return cls.nd(size, counts, tuple(math.ceil(s / c) for s, c in zip(size, counts)))

    @classmethod
    def nd_from_region_size(cls, size: Sequence[int], region_size: Union[int, Sequence[int]]) -> "RegionGrid":
        region = _tuple(region_size, len(size), "region_size")  # type: ignore[arg-type]
        _check_map(size)
        return cls.nd(size, tuple(math.ceil(s / r) for s, r in zip(size, region)), region)

    @property
    def size(self) -> Tuple[int, ...]:
        """Map size per axis: ``(H, W)`` or ``(D, H, W)``."""
        return (self.height, self.width) if self.ndim == 2 else (self.depth, self.height, self.width)

    @property
    def counts(self) -> Tuple[int, ...]:
        """Regions per axis."""
        return (self.rows, self.cols) if self.ndim == 2 else (self.planes, self.rows, self.cols)

    @property
    def region(self) -> Tuple[int, ...]:
        """Tokens per region along each axis."""
        return (self.region_h, self.region_w) if self.ndim == 2 else (self.region_d, self.region_h, self.region_w)

    @property
    def padded(self) -> Tuple[int, ...]:
        return tuple(c * r for c, r in zip(self.counts, self.region))

    @property
    def tokens(self) -> int:
        """Real tokens of the map (``H*W`` or ``D*H*W``)."""
        return _product(self.size)

    @property
    def num_regions(self) -> int:
        return _product(self.counts)

    @property
    def region_tokens(self) -> int:
        return _product(self.region)

    @property
    def padded_h(self) -> int:
        return self.rows * self.region_h

    @property
    def padded_w(self) -> int:
        return self.cols * self.region_w

    @property
    def padded_d(self) -> int:
        return self.planes * self.region_d

    @property
    def is_padded(self) -> bool:
        return self.padded_h != self.height or self.padded_w != self.width or self.padded_d != self.depth

    def describe(self) -> str:
        """``"2x3x3 regions for a 5x9x9 map"``, for messages."""
        return f"{'x'.join(map(str, self.counts))} regions for a {'x'.join(map(str, self.size))} map"

    def region_table(self, per_token: Tensor) -> Tensor:
        """A ``(*padded, ...)`` per-token tensor regrouped as ``(P, T, ...)`` (region-major, row-major inside)."""
        k = self.ndim
        rest = per_token.shape[k:]
        x = per_token.reshape(*_interleave(self.counts, self.region), *rest)
        x = x.permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2), *range(2 * k, 2 * k + len(rest)))
        return x.reshape(self.num_regions, self.region_tokens, *rest)

    def padded_valid(self, device: Optional[torch.device] = None) -> Tensor:
        """``(*padded,)`` bool in map layout: which tokens of the padded map are real."""
        valid = torch.ones((1,) * self.ndim, dtype=torch.bool, device=device)
        for axis, (p, s) in enumerate(zip(self.padded, self.size)):
            shape = [1] * self.ndim
            shape[axis] = p
            valid = valid & (torch.arange(p, device=device) < s).view(shape)
        return valid

    def token_valid(self, device: Optional[torch.device] = None) -> Tensor:
        """``(P, T)`` bool: which tokens of each region are real (not padding)."""
        return self.region_table(self.padded_valid(device))

    def region_token_counts(self, device: Optional[torch.device] = None) -> Tensor:
        """``(P,)`` number of real tokens in each region (0 for regions made only of padding)."""
        return self.token_valid(device).sum(-1)


def _check_map(size: Sequence[int]) -> None:
    if any(s < 1 for s in size):
        names = "HW" if len(size) == 2 else "DHW"
        raise ValueError(
            f"got an empty spatial size {'x'.join(map(str, size))}; expected "
            + " and ".join(f"{a} >= 1" for a in names)
        )


def resolve_grid(
    height: int,
    width: int,
    n_win: Optional[IntOrPair] = None,
    region_size: Optional[IntOrPair] = None,
) -> RegionGrid:
    """A 2D grid from exactly one of ``n_win`` (regions per side) or ``region_size`` (tokens per side)."""
    return resolve_grid_nd((height, width), n_win=n_win, region_size=region_size)


def resolve_grid_nd(
    size: Sequence[int],
    n_win: Optional[Union[int, Sequence[int]]] = None,
    region_size: Optional[Union[int, Sequence[int]]] = None,
) -> RegionGrid:
    """A 2D or 3D grid (by ``len(size)``) from exactly one of ``n_win`` or ``region_size``."""
    if (n_win is None) == (region_size is None):
        raise ValueError(
            f"got n_win={n_win!r} and region_size={region_size!r}; give exactly one of them"
        )
    if n_win is not None:
        return RegionGrid.nd_from_n_win(size, n_win)
    return RegionGrid.nd_from_region_size(size, region_size)  # type: ignore[arg-type]


def pad_map(x: Tensor, grid: RegionGrid) -> Tensor:
    """Zero-pad an ``(N, *size, C)`` map to the grid's padded size (at the end of every axis)."""
    if not grid.is_padded:
        return x
    pads = [0, 0]  # F.pad lists the last dim first: C, then the spatial axes innermost first
    for p, s in zip(reversed(grid.padded), reversed(grid.size)):
        pads += [0, p - s]
    return F.pad(x, pads)


def to_regions(x: Tensor, grid: RegionGrid, num_heads: int) -> Tensor:
    """``(N, *size, heads*d)`` -> ``(N, P, heads, T, d)``, padded; always a fresh contiguous tensor."""
    n, c, k = x.shape[0], x.shape[-1], grid.ndim
    x = pad_map(x, grid)
    x = x.reshape(n, *_interleave(grid.counts, grid.region), num_heads, c // num_heads)
    # (N, c1, r1, .., ck, rk, heads, d) -> (N, c1..ck, heads, r1..rk, d)
    x = x.permute(0, *range(1, 2 * k + 1, 2), 2 * k + 1, *range(2, 2 * k + 1, 2), 2 * k + 2)
    return x.reshape(n, grid.num_regions, num_heads, grid.region_tokens, c // num_heads)


def crop_map(x: Tensor, grid: RegionGrid) -> Tensor:
    """``(N, *padded, C)`` -> ``(N, *size, C)``: the padding cut away (a view)."""
    if not grid.is_padded:
        return x
    return x[(slice(None), *(slice(0, s) for s in grid.size))]


def from_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """``(N, P, heads, T, d)`` -> ``(N, *size, heads*d)``, with the padding cropped away."""
    n, _, heads, _, d = x.shape
    k = grid.ndim
    x = x.view(n, *grid.counts, heads, *grid.region, d)
    # (N, c1..ck, heads, r1..rk, d) -> (N, c1, r1, .., ck, rk, heads, d)
    x = x.permute(0, *(a for i in range(k) for a in (1 + i, k + 2 + i)), k + 1, 2 * k + 2)
    return crop_map(x.reshape(n, *grid.padded, heads * d), grid)


def region_means(x: Tensor, grid: RegionGrid) -> Tensor:
    """Mean of each region's real tokens: ``(N, *size, C)`` -> ``(N, P, C)``.

    Regions made only of padding get a zero descriptor; routing masks them out anyway.
    Sums accumulate and return in float32 whatever the input dtype (routing is decided in fp32).
    Sums run in two passes (along the innermost region axis, then over the others): one reduction
    over non-adjacent dims of a strided slice is several times slower on the CPU.
    """
    n, c, k = x.shape[0], x.shape[-1], grid.ndim
    x = pad_map(x, grid)
    if grid.is_padded:
        valid = grid.padded_valid(x.device).unsqueeze(-1)  # (*padded, 1)
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    sums = x.reshape(n, *_interleave(grid.counts, grid.region), c).sum(2 * k, dtype=torch.float32)
    sums = sums.sum(tuple(range(2, 2 * k, 2)))  # (N, c1, .., ck, C)
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

    ``q`` and ``k`` are ``(N, H, W, C_qk)`` or ``(N, D, H, W, C_qk)`` maps. Routing carries no gradient, as in the original.
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
