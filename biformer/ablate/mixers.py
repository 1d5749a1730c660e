"""Token mixers for the attention ablation: BRA and the attentions the paper compares it with.

Every mixer has the interface of :class:`~biformer.layers.BiLevelRoutingAttention` and the same
parts around the mixing step, so that in a model only the token mixing differs:

* kept equal: the one q/k/v projection ``Linear(dim, 2 * qk_dim + dim)``, the LCE (a depthwise
  conv on V added to the attention output), the output projection ``Linear(dim, dim)``, the head
  count, and the logit scale ``qk_dim ** -0.5`` (BRA's, the whole q/k width);
* different: which keys each query attends to, and how.

The window-type mixers use the same region grid as BRA (``n_win`` regions per side, or
``region_size`` tokens per side): a window is a region, so a query attends to ``T`` tokens there
and to ``topk * T`` tokens under routing. Maps that the grid does not divide are zero-padded and
the padded keys are masked, as in BRA.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import maxxvit, swin_transformer
from torch import Tensor

from ..errors import UserValueError
from ..layers import BiLevelRoutingAttention, GlobalAttentionLCE, _check_layout, _depthwise, _to_nhwc
from ..ops.backends import BACKENDS
from ..ops.bra import select_backend
from ..ops.regions import IntOrPair, RegionGrid, Routing, resolve_grid

__all__ = [
    "MIXERS",
    "ROUTED_MIXERS",
    "AxialAttention",
    "DilatedAttention",
    "FullAttention",
    "RandomRouting",
    "RoutedMixer",
    "ShiftedWindowAttention",
    "StaticRouting",
    "TokenMixer",
    "WindowAttention",
    "build_mixer",
    "nearest_regions",
]


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float,
                         mask: Optional[Tensor] = None) -> Tensor:
    """Attention within each group: ``(B, L, C_qk)``, ``(B, S, C_qk)``, ``(B, S, C_v)`` -> ``(B, L, C_v)``.

    ``mask``: bool, broadcastable to ``(B, L, S)``, True where a query may attend a key. The core is
    torch's ``F.scaled_dot_product_attention``.
    """
    b, length, _ = q.shape

    def heads(x: Tensor) -> Tensor:  # (B, L, C) -> (B, h, L, C/h)
        return x.reshape(b, x.shape[1], num_heads, x.shape[-1] // num_heads).transpose(1, 2)

    if mask is not None:
        mask = mask.unsqueeze(-3)  # (B, L, S) -> (B, 1, L, S): the same for every head
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, length, v.shape[-1])  # (B, h, L, d) -> (B, L, C_v)


class TokenMixer(nn.Module):
    """BRA's layer with the mixing step left open: q/k/v projection, ``mix``, LCE on V, output projection.

    ``(N, dim, H, W)`` in and out (``layout="NHWC"``: ``(N, H, W, dim)``). Subclasses implement
    :meth:`mix` on channels-last ``q, k, v`` and keep everything else, so their parameters are
    exactly BRA's (same names, shapes and initialisation).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        side_dwconv: int = 5,
        *,
        qk_dim: Optional[int] = None,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        layout: str = "NCHW",
    ) -> None:
        super().__init__()
        _check_layout(layout)
        qk_dim = qk_dim or dim
        if qk_dim % num_heads or dim % num_heads:
            raise UserValueError(f"got num_heads={num_heads}, which must divide dim={dim} and qk_dim={qk_dim}")
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.scale = qk_scale or qk_dim ** -0.5
        self.layout = layout
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=qkv_bias)
        self.lce = _depthwise(dim, side_dwconv)
        self.proj = nn.Linear(dim, dim)

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``(N, H, W, C_qk)``, ``(N, H, W, C_qk)``, ``(N, H, W, C)`` -> ``(N, H, W, C)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = _to_nhwc(x, self.dim, self.layout)  # (N, H, W, C)
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        out = self.mix(q, k, v)  # (N, H, W, C)
        if self.lce is not None:
            out = out + self.lce(v.contiguous().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.proj(out)
        return out.permute(0, 3, 1, 2) if self.layout == "NCHW" else out


class FullAttention(TokenMixer):
    """Every token attends to every token of the map (vanilla multi-head self-attention).

    Kept equal to BRA: projections, LCE, heads, scale. Core: torch's SDPA.
    """

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, h, w, _ = q.shape
        out = multi_head_attention(q.reshape(n, h * w, -1), k.reshape(n, h * w, -1), v.reshape(n, h * w, -1),
                                   self.num_heads, self.scale)  # (N, HW, C)
        return out.view(n, h, w, -1)


class _GridMixer(TokenMixer):
    """A mixer that cuts the map by BRA's region grid (``n_win`` or ``region_size``)."""

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, side_dwconv: int = 5, *,
                 region_size: Optional[IntOrPair] = None, **kwargs: object) -> None:
        super().__init__(dim, num_heads, side_dwconv, **kwargs)  # type: ignore[arg-type]
        self.n_win = None if region_size is not None else n_win
        self.region_size = region_size

    def grid(self, height: int, width: int) -> RegionGrid:
        return resolve_grid(height, width, self.n_win, self.region_size)

    def extra_repr(self) -> str:
        where = f"n_win={self.n_win}" if self.region_size is None else f"region_size={self.region_size}"
        return f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, {where}"


def _padded_with_valid(x: Tensor, grid: RegionGrid, multiple: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """Zero-pad ``(N, H, W, C)`` at the bottom/right to multiples of ``multiple``; also the ``(1, Hp, Wp, 1)``
    float map of real tokens (1) and padding (0), which goes through the same partitions as ``x``."""
    ph = math.ceil(grid.height / multiple[0]) * multiple[0] - grid.height
    pw = math.ceil(grid.width / multiple[1]) * multiple[1] - grid.width
    valid = torch.ones(1, grid.height, grid.width, 1, device=x.device, dtype=x.dtype)
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        valid = F.pad(valid, (0, 0, 0, pw, 0, ph))
    return x, valid


class WindowAttention(_GridMixer):
    """Attention inside non-overlapping windows, a window being one of BRA's regions (Swin's W-MSA).

    Kept equal to BRA: projections, LCE, heads, scale, and the region grid (window = region, so
    this is BRA with every region routed to itself only). Built from timm's Swin
    ``window_partition`` / ``window_reverse`` (``timm.models.swin_transformer``) and torch's SDPA;
    Swin's relative position bias is left out, because BRA has none (position comes from the LCE).
    """

    def shift(self, grid: RegionGrid) -> Tuple[int, int]:
        return 0, 0

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, height, width, _ = q.shape
        grid = self.grid(height, width)
        window = (grid.region_h, grid.region_w)
        qkv = torch.cat([q, k, v], dim=-1)
        qkv, valid = _padded_with_valid(qkv, grid, window)  # (N, Hp, Wp, 2C_qk + C)
        hp, wp = qkv.shape[1:3]
        shift = self.shift(grid)
        if any(shift):  # Swin's cyclic shift: windows of the rolled map straddle the unrolled windows
            qkv = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            valid = torch.roll(valid, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = swin_transformer.window_partition(qkv, window).flatten(1, 2)  # (N*nW, T, 2C_qk + C)
        key_valid = swin_transformer.window_partition(valid, window).flatten(1, 2)[..., 0] > 0  # (nW, T)
        mask = key_valid[:, None, :]  # (nW, 1, T)
        if any(shift):
            mask = mask & swin_shift_mask(hp, wp, window, shift, q.device)  # (nW, T, T)
        if not bool(mask.all()):
            mask = mask.repeat(n, 1, 1)  # windows are numbered image-major: (N*nW, ., T)
        else:
            mask = None
        qw, kw, vw = windows.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        out = multi_head_attention(qw, kw, vw, self.num_heads, self.scale, mask)  # (N*nW, T, C)
        out = swin_transformer.window_reverse(out.view(-1, *window, self.dim), window, hp, wp)  # (N, Hp, Wp, C)
        if any(shift):
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :height, :width]


def swin_shift_mask(height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                    device: torch.device) -> Tensor:
    """``(nW, T, T)`` bool: which tokens of a window of the rolled map may attend which (Swin's SW-MSA mask).

    Computed by timm's ``SwinTransformerBlock.get_attn_mask`` (which marks forbidden pairs -100).
    """
    block = SimpleNamespace(window_size=window, shift_size=shift, window_area=window[0] * window[1])
    probe = torch.zeros(1, height, width, 1, device=device)  # only its shape, device and dtype are read
    additive = swin_transformer.SwinTransformerBlock.get_attn_mask(block, probe)  # type: ignore[arg-type]
    return additive == 0


class ShiftedWindowAttention(WindowAttention):
    """Swin's W-MSA / SW-MSA pair: window attention in even blocks, shifted windows in odd blocks.

    Kept equal to BRA: projections, LCE, heads, scale, region grid. The shift is half a window, on
    a cyclically rolled map with Swin's mask so that no token attends across the wrap-around; it is
    0 on a side the window already covers (as in Swin). Built from timm's Swin ``window_partition``
    and ``SwinTransformerBlock.get_attn_mask`` and torch's SDPA.
    """

    def __init__(self, *args: object, shifted: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.shifted = shifted

    def shift(self, grid: RegionGrid) -> Tuple[int, int]:
        if not self.shifted:
            return 0, 0
        return (grid.region_h // 2 if grid.rows > 1 else 0, grid.region_w // 2 if grid.cols > 1 else 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shifted={self.shifted}"


class DilatedAttention(_GridMixer):
    """Dilated (strided) window attention: each group holds ``T`` tokens spaced ``dilation`` apart.

    * ``mode="global"``: the dilation spans the whole map (MaxViT's grid attention, CrossFormer's
      long-distance attention): a group takes one token from every region, at the same offset.
    * ``mode="local"``: dilation 2 inside blocks of ``2 x 2`` regions (1 on a side with one region).

    Kept equal to BRA: projections, LCE, heads, scale, and the group size ``T`` of a region. Built
    from timm's MaxViT ``window_partition`` / ``grid_partition`` and their reverses
    (``timm.models.maxxvit``) and torch's SDPA.
    """

    def __init__(self, *args: object, mode: str = "global", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if mode not in ("global", "local"):
            raise UserValueError(f"got mode={mode!r}, expected 'global' or 'local'")
        self.mode = mode

    def dilation(self, grid: RegionGrid) -> Tuple[int, int]:
        if self.mode == "global":
            return grid.rows, grid.cols
        return min(2, grid.rows), min(2, grid.cols)

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, height, width, _ = q.shape
        grid = self.grid(height, width)
        group = [grid.region_h, grid.region_w]
        dil = self.dilation(grid)
        block = [group[0] * dil[0], group[1] * dil[1]]  # the area one set of groups tiles
        qkv, valid = _padded_with_valid(torch.cat([q, k, v], dim=-1), grid, tuple(block))  # type: ignore[arg-type]
        hp, wp = qkv.shape[1:3]

        def partition(x: Tensor) -> Tensor:  # (B, Hp, Wp, C) -> (B * groups, T, C)
            blocks = maxxvit.window_partition(x, block)  # (B * blocks, bh, bw, C)
            return maxxvit.grid_partition(blocks, group).flatten(1, 2)  # (B * groups, T, C)

        groups = partition(qkv)
        key_valid = partition(valid)[..., 0] > 0  # (groups, T)
        mask = None if bool(key_valid.all()) else key_valid[:, None, :].repeat(n, 1, 1)
        qg, kg, vg = groups.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        out = multi_head_attention(qg, kg, vg, self.num_heads, self.scale, mask)  # (B * groups, T, C)
        out = maxxvit.grid_reverse(out.view(-1, *group, self.dim), group, block)  # (B * blocks, bh, bw, C)
        out = maxxvit.window_reverse(out, block, [hp, wp])  # (N, Hp, Wp, C)
        return out[:, :height, :width]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}"


class AxialAttention(TokenMixer):
    """Criss-cross attention (CCNet): each token attends to its row and its column, in one softmax.

    Kept equal to BRA: projections, LCE, heads, scale. The token itself is counted once (in its
    row). CCNet's own op is a CUDA kernel (mmcv), not a dependency here, so the two einsums and
    the joint softmax are written here, following CCNet's definition.
    """

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, h, w, _ = q.shape
        heads = self.num_heads

        def split(x: Tensor) -> Tensor:  # (N, H, W, C) -> (N, heads, H, W, C/heads)
            return x.reshape(n, h, w, heads, x.shape[-1] // heads).permute(0, 3, 1, 2, 4)

        qh, kh, vh = split(q) * self.scale, split(k), split(v)
        row = torch.einsum("nayxd,nayjd->nayxj", qh, kh)  # (N, heads, H, W, W): keys in the same row
        col = torch.einsum("nayxd,naixd->nayxi", qh, kh)  # (N, heads, H, W, H): keys in the same column
        self_in_col = torch.eye(h, dtype=torch.bool, device=q.device).view(h, 1, h)  # (H, 1, H): y == i
        col = col.masked_fill(self_in_col, float("-inf"))
        weights = torch.cat([row, col], dim=-1).softmax(dim=-1)  # (N, heads, H, W, W + H)
        out = torch.einsum("nayxj,nayjd->nayxd", weights[..., :w], vh)
        out = out + torch.einsum("nayxi,naixd->nayxd", weights[..., w:], vh)  # (N, heads, H, W, d)
        return out.permute(0, 2, 3, 1, 4).reshape(n, h, w, self.dim)


class RoutedMixer(_GridMixer):
    """BRA's token-level attention with another region-level routing rule.

    The attention runs on BRA's own backends (``biformer.ops.backends.BACKENDS[name].run``); only
    :meth:`routing` differs from BRA. Kept equal to BRA: projections, LCE, heads, scale, region
    grid, ``topk`` and the attention over the routed regions' tokens.
    """

    def __init__(self, *args: object, topk: int = 4, backend: str = "auto", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if topk < 1:
            raise UserValueError(f"got topk={topk}, expected a positive number of routed regions")
        if backend != "auto" and backend not in BACKENDS:
            raise UserValueError(f"got backend={backend!r}, expected 'auto' or one of {tuple(BACKENDS)}")
        self.topk = topk
        self.backend = backend

    def routing(self, q: Tensor, k: Tensor, grid: RegionGrid) -> Routing:
        raise NotImplementedError

    def mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, height, width, _ = q.shape
        grid = self.grid(height, width)
        regions = int((grid.region_token_counts() > 0).sum())
        if self.topk > regions:
            raise UserValueError(f"got topk={self.topk} but the {height}x{width} map has only {regions} regions")
        routing = self.routing(q, k, grid)
        name = select_backend(grid, self.topk) if self.backend == "auto" else self.backend
        return BACKENDS[name].run(q, k, v, routing, self.num_heads, self.scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", topk={self.topk}"


class RandomRouting(RoutedMixer):
    """BRA with the ``topk`` key regions of each query region drawn at random instead of routed.

    Drawn afresh at every forward pass in training (each query region of each image gets its own
    ``topk`` distinct non-padding regions), from torch's global generator, which
    ``biformer train`` seeds per update from ``(seed, update)``: runs are reproducible and resume
    exactly. In eval mode the draw comes from a private generator reset to ``eval_seed`` at every
    forward, so evaluation is deterministic. Kept equal to BRA: see :class:`RoutedMixer`.
    """

    def __init__(self, *args: object, eval_seed: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eval_seed = eval_seed

    @torch.no_grad()
    def routing(self, q: Tensor, k: Tensor, grid: RegionGrid) -> Routing:
        n, p = q.shape[0], grid.num_regions
        generator = None
        if not self.training:
            generator = torch.Generator(device=q.device).manual_seed(self.eval_seed)
        keys = torch.rand(n, p, p, generator=generator, device=q.device)  # (N, P, P): a random order
        if grid.is_padded:  # regions of padding only sort last, so they are never drawn
            keys = keys.masked_fill(grid.region_token_counts(q.device) == 0, -1.0)
        indices = keys.topk(self.topk, dim=-1).indices  # (N, P, topk), distinct
        return Routing(indices, torch.zeros(indices.shape, dtype=q.dtype, device=q.device), grid)


def nearest_regions(grid: RegionGrid, topk: int, device: Optional[torch.device] = None) -> Tensor:
    """``(P, topk)``: for each region, the ``topk`` non-padding regions whose centres are nearest to
    its centre (itself first), ties broken by region number."""
    rows = torch.arange(grid.rows, device=device, dtype=torch.float64).repeat_interleave(grid.cols)
    cols = torch.arange(grid.cols, device=device, dtype=torch.float64).repeat(grid.rows)
    centres = torch.stack([(rows + 0.5) * grid.region_h, (cols + 0.5) * grid.region_w], dim=-1)  # (P, 2)
    distance = torch.cdist(centres, centres)  # (P, P)
    distance = distance.masked_fill(grid.region_token_counts(device) == 0, float("inf"))
    return distance.sort(dim=-1, stable=True).indices[:, :topk]


class StaticRouting(RoutedMixer):
    """BRA with each query region routed to its ``topk`` nearest regions by region-centre distance.

    The routing depends on the grid only, not on the content (a fixed local neighbourhood of
    regions). Kept equal to BRA: see :class:`RoutedMixer`.
    """

    def routing(self, q: Tensor, k: Tensor, grid: RegionGrid) -> Routing:
        indices = nearest_regions(grid, self.topk, q.device).expand(q.shape[0], -1, -1)  # (N, P, topk)
        return Routing(indices, torch.zeros(indices.shape, dtype=q.dtype, device=q.device), grid)


# name -> what it is (the names `biformer ablate --mixers` takes)
MIXERS: Dict[str, str] = {
    "bra": "Bi-Level Routing Attention (ours): top-k regions by region-mean affinity",
    "window": "window attention (Swin W-MSA), window = region",
    "shifted_window": "Swin W-MSA / SW-MSA alternating by block, window = region",
    "axial": "criss-cross attention (CCNet): the token's row and column",
    "dilated_global": "dilated attention over the whole map (MaxViT grid attention)",
    "dilated_local": "dilated attention, dilation 2 within 2x2 regions",
    "full": "full self-attention over the map",
    "random": "BRA with top-k regions drawn at random (new draw every training forward)",
    "static": "BRA routed to the top-k nearest regions by centre distance",
}
ROUTED_MIXERS = frozenset({"bra", "random", "static"})  # the mixers that take topk


def build_mixer(
    name: str,
    dim: int,
    *,
    num_heads: int,
    topk: int = 4,
    n_win: Optional[int] = 7,
    region_size: Optional[IntOrPair] = None,
    side_dwconv: int = 5,
    qk_dim: Optional[int] = None,
    block: int = 0,
    backend: str = "auto",
    layout: str = "NHWC",
) -> nn.Module:
    """The named mixer with BRA's settings (``block``: index in its stage, for the Swin alternation)."""
    if name not in MIXERS:
        raise UserValueError(f"got mixer {name!r}, expected one of {', '.join(MIXERS)}")
    grid_kwargs = dict(n_win=n_win or 7, side_dwconv=side_dwconv, region_size=region_size, qk_dim=qk_dim,
                       layout=layout)
    if name == "bra":
        return BiLevelRoutingAttention(dim, num_heads=num_heads, topk=topk, backend=backend, **grid_kwargs)
    if name == "window":
        return WindowAttention(dim, num_heads, **grid_kwargs)
    if name == "shifted_window":
        return ShiftedWindowAttention(dim, num_heads, shifted=block % 2 == 1, **grid_kwargs)
    if name in ("dilated_global", "dilated_local"):
        return DilatedAttention(dim, num_heads, mode=name.split("_")[1], **grid_kwargs)
    if name == "random":
        return RandomRouting(dim, num_heads, topk=topk, backend=backend, **grid_kwargs)
    if name == "static":
        return StaticRouting(dim, num_heads, topk=topk, backend=backend, **grid_kwargs)
    plain = dict(side_dwconv=side_dwconv, qk_dim=qk_dim, layout=layout)
    return (AxialAttention if name == "axial" else FullAttention)(dim, num_heads, **plain)


def mixer_factory(name: str) -> Callable[..., nn.Module]:
    """An ``attn_factory`` for :class:`~biformer.models.biformer.BiFormer`: the named mixer in every
    routed stage; stages without routing (``topk=None``) keep BiFormer's global attention, so they
    are the same in every variant."""
    if name not in MIXERS:
        raise UserValueError(f"got mixer {name!r}, expected one of {', '.join(MIXERS)}")

    def factory(*, dim: int, block: int, topk: Optional[int], num_heads: int, qk_dim: int,
                n_win: Optional[int], region_size: Optional[IntOrPair], side_dwconv: int,
                backend: str) -> nn.Module:
        if topk is None:
            return GlobalAttentionLCE(dim, num_heads=8, side_dwconv=side_dwconv)
        return build_mixer(name, dim, num_heads=num_heads, topk=topk, n_win=n_win, region_size=region_size,
                           side_dwconv=side_dwconv, qk_dim=qk_dim, block=block, backend=backend)

    return factory
