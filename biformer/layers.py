"""Attention layers: Bi-Level Routing Attention and BiFormer's last-stage global attention.

Both only project and call a functional op; the routing and attention live in :mod:`biformer.ops`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import UserValueError
from .ops import bi_level_routing_attention, bi_level_routing_attention_3d
from .ops.compiled import depthwise_conv_nhwc
from .ops.regions import IntOrPair, IntOrTriple

DEFAULT_N_WIN = 7
DEFAULT_N_WIN_3D = 4  # 4x4x4 = 64 regions, about the 49 of the 2D default

_LAYOUTS_3D = ("NCDHW", "NDHWC")

_LAYOUTS = ("NCHW", "NHWC")

# FX: the op (routing, padding, backend choice) and the input check branch on shapes, so a symbolic
# trace records them as single calls (leaves) instead of tracing into them; autograd passes through.
torch.fx.wrap("bi_level_routing_attention")
torch.fx.wrap("_to_nhwc")
torch.fx.wrap("bi_level_routing_attention_3d")


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise UserValueError(f"got layout={layout!r}, expected one of {_LAYOUTS}")


def _to_nhwc(x: Tensor, dim: int, layout: str) -> Tensor:
    """Validate an input map and return it channels-last (a view, no copy)."""
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D {layout} tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    channels = x.shape[1] if layout == "NCHW" else x.shape[-1]
    if channels != dim:
        raise ValueError(
            f"got {channels} input channels (shape {tuple(x.shape)}, layout {layout}), expected dim={dim}"
        )
    if x.shape[-2] == 0 or x.shape[-3 if layout == "NHWC" else -1] == 0:
        raise ValueError(f"got an empty spatial size in input of shape {tuple(x.shape)} ({layout})")
    return x.permute(0, 2, 3, 1) if layout == "NCHW" else x


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise UserValueError(f"got {name}={value!r}, expected a positive integer")


def _check_side_dwconv(side_dwconv: object) -> None:
    # an even kernel with padding k//2 grows the map by one pixel, so the sum with attention fails
    if not _is_int(side_dwconv) or side_dwconv < 0 or (side_dwconv > 0 and side_dwconv % 2 == 0):  # type: ignore[operator]
        raise UserValueError(
            f"got side_dwconv={side_dwconv!r}, expected 0 (no local context enhancement) or an odd kernel size"
        )


def _check_grid_pair(name: str, value: IntOrPair) -> tuple:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(_is_int(v) and v >= 1 for v in pair):
        raise UserValueError(f"got {name}={value!r}, expected a positive integer or a pair of them")
    return pair


def _check_grid_triple(name: str, value: IntOrTriple) -> tuple:
    triple = (value,) * 3 if not isinstance(value, (tuple, list)) else tuple(value)
    if len(triple) != 3 or not all(_is_int(v) and v >= 1 for v in triple):
        raise UserValueError(f"got {name}={value!r}, expected a positive integer or three of them (d, h, w)")
    return triple


def _depthwise(dim: int, kernel_size: int) -> Optional[nn.Conv2d]:
    if kernel_size <= 0:
        return None
    return nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

def _check_routed_layer(
    dim: int, num_heads: int, qk_dim: Optional[int], topk: int, side_dwconv: int, n_win: Optional[object],
    region_size: Optional[object], qk_scale: Optional[float], default_n_win: object,
    check_grid: Callable[[str, object], Tuple[int, ...]], hint: Callable[[int], str] = lambda topk: "",
) -> Tuple[int, Optional[object]]:
    """The argument checks the 2D and 3D BRA layers share; returns ``(qk_dim, n_win)`` resolved."""
    _check_positive_int("dim", dim)
    _check_positive_int("num_heads", num_heads)
    if qk_dim is not None:
        _check_positive_int("qk_dim", qk_dim)
    qk_dim = dim if qk_dim is None else qk_dim
    if qk_dim % num_heads or dim % num_heads:
        raise UserValueError(f"got num_heads={num_heads}, which must divide dim={dim} and qk_dim={qk_dim}")
    _check_positive_int("topk", topk)
    _check_side_dwconv(side_dwconv)
    if n_win is not None and region_size is not None:
        raise UserValueError(f"got n_win={n_win!r} and region_size={region_size!r}; give at most one of them")
    if region_size is not None:
        check_grid("region_size", region_size)
    else:
        n_win = default_n_win if n_win is None else n_win
        regions = math.prod(check_grid("n_win", n_win))
        if topk > regions:
            raise UserValueError(
                f"got topk={topk} but the map has only {regions} regions (n_win={n_win!r}); "
                f"expected 1 <= topk <= {regions}{hint(topk)}"
            )
    if qk_scale is not None and not (isinstance(qk_scale, (int, float)) and math.isfinite(qk_scale) and qk_scale > 0):
        raise UserValueError(f"got qk_scale={qk_scale!r}, expected a finite number > 0 (or None for qk_dim ** -0.5)")
    return qk_dim, n_win



class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention (BiFormer, CVPR 2023) as a drop-in layer.

    ``(N, dim, H, W)`` in, ``(N, dim, H, W)`` out, any ``H x W`` (``layout="NHWC"`` for
    ``(N, H, W, dim)``). Maps that the region grid does not divide are padded and masked inside
    the op, so the output does not depend on the padding.

    Args:
        dim: input and output channels.
        num_heads: attention heads (must divide ``dim`` and ``qk_dim``).
        n_win: regions per side (an int or a pair); default 7 unless ``region_size`` is given.
        topk: regions each query region attends to.
        side_dwconv: kernel of the local context enhancement (LCE), a depthwise conv on V whose
            output is added to the attention output; 0 disables it. Must be odd (an even kernel
            would change the map size).
        qk_dim: width of queries and keys (default ``dim``).
        region_size: tokens per region side, instead of ``n_win`` (giving both is refused).
        qkv_bias: bias of the q/k/v projection.
        qk_scale: logit scale, finite and > 0; default ``qk_dim ** -0.5`` (the whole width, as in
            the original).
        layout: ``"NCHW"`` or ``"NHWC"``.
        backend: attention backend of :func:`biformer.ops.bi_level_routing_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: Optional[IntOrPair] = None,
        topk: int = 4,
        side_dwconv: int = 5,
        *,
        qk_dim: Optional[int] = None,
        region_size: Optional[IntOrPair] = None,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        layout: str = "NCHW",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_layout(layout)
        qk_dim, n_win = _check_routed_layer(
            dim, num_heads, qk_dim, topk, side_dwconv, n_win, region_size, qk_scale, DEFAULT_N_WIN, _check_grid_pair,
            hint=lambda topk: f", or n_win >= {math.ceil(math.sqrt(topk))} for topk={topk}",
        )
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.region_size = region_size
        self.topk = topk
        self.scale = float(qk_scale) if qk_scale is not None else qk_dim ** -0.5
        self.layout = layout
        self.backend = backend
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=qkv_bias)
        self.lce = _depthwise(dim, side_dwconv)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        grid = f"n_win={self.n_win}" if self.region_size is None else f"region_size={self.region_size}"
        return f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, {grid}, topk={self.topk}"

    def forward(self, x: Tensor) -> Tensor:
        x = _to_nhwc(x, self.dim, self.layout)  # (N, H, W, C)
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        out = bi_level_routing_attention(
            q, k, v,
            num_heads=self.num_heads,
            topk=self.topk,
            n_win=self.n_win,
            region_size=self.region_size,
            scale=self.scale,
            backend=self.backend,
        )  # (N, H, W, C)
        if self.lce is not None:
            local = depthwise_conv_nhwc(v, self.lce)  # (N, H, W, C)
            # SDPA keeps its output for backward, so only inference may add in place
            out = out + local if torch.is_grad_enabled() else out.add_(local)
        out = self.proj(out)
        return out.permute(0, 3, 1, 2) if self.layout == "NCHW" else out


def _to_ndhwc(x: Tensor, dim: int, layout: str) -> Tensor:
    """Validate an input volume and return it channels-last (a view, no copy)."""
    if x.dim() != 5:
        raise ValueError(f"expected a 5-D {layout} tensor, got {x.dim()}-D with shape {tuple(x.shape)}")
    channels = x.shape[1] if layout == "NCDHW" else x.shape[-1]
    if channels != dim:
        raise ValueError(
            f"got {channels} input channels (shape {tuple(x.shape)}, layout {layout}), expected dim={dim}"
        )
    spatial = x.shape[2:] if layout == "NCDHW" else x.shape[1:4]
    if any(s == 0 for s in spatial):
        raise ValueError(f"got an empty spatial size in input of shape {tuple(x.shape)} ({layout})")
    return x.permute(0, 2, 3, 4, 1) if layout == "NCDHW" else x


class BiLevelRoutingAttention3d(nn.Module):
    """Bi-Level Routing Attention on volumes and video clips.

    ``(N, dim, D, H, W)`` in, ``(N, dim, D, H, W)`` out, any ``D x H x W`` (``layout="NDHWC"`` for
    ``(N, D, H, W, dim)``). The same layer as :class:`BiLevelRoutingAttention` on a 3D region grid
    (:func:`biformer.ops.bi_level_routing_attention_3d`): regions are ``d x h x w`` token blocks,
    padding is masked inside the op, and the LCE is a depthwise 3D conv on V.

    Args:
        dim: input and output channels.
        num_heads: attention heads (must divide ``dim`` and ``qk_dim``).
        n_win: regions per axis, an int (all three axes) or ``(d, h, w)``; default 4 unless
            ``region_size`` is given.
        topk: regions each query region attends to.
        side_dwconv: kernel of the LCE (depthwise ``Conv3d`` on V); 0 disables it; must be odd.
        qk_dim: width of queries and keys (default ``dim``).
        region_size: tokens per region along each axis, instead of ``n_win`` (giving both is refused).
        qkv_bias: bias of the q/k/v projection.
        qk_scale: logit scale, finite and > 0; default ``qk_dim ** -0.5``.
        layout: ``"NCDHW"`` or ``"NDHWC"``.
        backend: attention backend of :func:`biformer.ops.bi_level_routing_attention_3d`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: Optional[IntOrTriple] = None,
        topk: int = 4,
        side_dwconv: int = 3,
        *,
        qk_dim: Optional[int] = None,
        region_size: Optional[IntOrTriple] = None,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        layout: str = "NCDHW",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if layout not in _LAYOUTS_3D:
            raise UserValueError(f"got layout={layout!r}, expected one of {_LAYOUTS_3D}")
        qk_dim, n_win = _check_routed_layer(
            dim, num_heads, qk_dim, topk, side_dwconv, n_win, region_size, qk_scale, DEFAULT_N_WIN_3D,
            _check_grid_triple,
        )
        self.dim = dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.region_size = region_size
        self.topk = topk
        self.scale = float(qk_scale) if qk_scale is not None else qk_dim ** -0.5
        self.layout = layout
        self.backend = backend
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=qkv_bias)
        self.lce = (
            nn.Conv3d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        )
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        grid = f"n_win={self.n_win}" if self.region_size is None else f"region_size={self.region_size}"
        return f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, {grid}, topk={self.topk}"

    def forward(self, x: Tensor) -> Tensor:
        x = _to_ndhwc(x, self.dim, self.layout)  # (N, D, H, W, C)
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        out = bi_level_routing_attention_3d(
            q, k, v,
            num_heads=self.num_heads,
            topk=self.topk,
            n_win=self.n_win,
            region_size=self.region_size,
            scale=self.scale,
            backend=self.backend,
        )  # (N, D, H, W, C)
        if self.lce is not None:
            # the NCDHW view of a contiguous NDHWC map is channels_last_3d
            local = self.lce(v.contiguous().permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # (N, D, H, W, C)
            out = out + local
        out = self.proj(out)
        return out.permute(0, 4, 1, 2, 3) if self.layout == "NCDHW" else out


class GlobalAttentionLCE(nn.Module):
    """Plain multi-head self-attention over the whole map, plus LCE on the attention's *input*.

    BiFormer's last stage (7x7 at 224^2) uses this instead of routing. Scale is ``head_dim ** -0.5``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        side_dwconv: int = 5,
        *,
        qkv_bias: bool = False,
        layout: str = "NHWC",
    ) -> None:
        super().__init__()
        _check_layout(layout)
        _check_positive_int("dim", dim)
        _check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise UserValueError(f"got num_heads={num_heads}, which must divide dim={dim}")
        _check_side_dwconv(side_dwconv)
        self.dim = dim
        self.num_heads = num_heads
        self.layout = layout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lce = _depthwise(dim, side_dwconv)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = _to_nhwc(x, self.dim, self.layout)  # (N, H, W, C)
        # sizes from x.shape as a whole, not unpacked, so an FX trace stays valid for any H x W
        qkv = self.qkv(x).reshape(x.shape[0], -1, 3, self.num_heads, self.dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, d)
        out = out.transpose(1, 2).reshape(x.shape)  # (N, HW, heads, d) -> (N, H, W, C)
        if self.lce is not None:
            out = out + depthwise_conv_nhwc(x, self.lce)
        out = self.proj(out)
        return out.permute(0, 3, 1, 2) if self.layout == "NCHW" else out
