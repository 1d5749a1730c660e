"""Formulations for ``torch.compile``: eager-optimal kernels inductor must not re-lay out.

Under inductor (torch 2.14, CPU) two of our eager fast paths lose their speed:

* the depthwise convs (LCE and CPE): inductor materialises the gradient that reaches
  ``convolution_backward`` as contiguous NCHW while the saved input is another layout, and mkldnn's
  mixed-layout depthwise backward runs about 2x slower than eager's all-channels-last one;
* routed SDPA: inductor lowers the routed ``index_select`` into a gather whose output layout it
  picks itself (head-minor channels), so SDPA then needs a copy of every operand in forward and
  again in backward, and the index-add backward becomes a separate scalar scatter kernel.

Both are wrapped here as custom ops (``torch.library.custom_op``) with a registered fake and an
autograd formula whose backward is itself a custom op, so inductor treats them as opaque kernels
and runs exactly the eager code inside. They are used only while compiling (not while exporting:
ONNX has no translation for them), see :func:`use_compiled_ops`.

Measured (one BiFormer-S stage-2 block, 28x28x128, batch 8, fwd+bwd, 1 thread, interleaved medians,
on the shared 2-core machine at load ~12: ``python tools/compile_layer.py --stage 2 --train``):
compiled/eager speed 0.78x before these ops, 0.85x with them, 0.94x once the op saved SDPA's operands
instead of re-gathering them. The largest single loss was elsewhere: the check for non-finite
inputs (:mod:`biformer.ops.nonfinite`) ran in full in every compiled call; behind a ``torch.cond``
branch, whole-model BiFormer-S compiled/eager went from 0.85x to 0.94x in training and to 1.07x in
inference (``biformer bench --table targets``, quiet machine, 2026-12-02).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .gather import query_regions, routed_key_valid, routed_rows
from .regions import RegionGrid, Routing


def use_compiled_ops(x: Tensor) -> bool:
    """Inside ``torch.compile`` on the CPU, but not ``torch.export`` / ONNX export."""
    # is_compiling() first: under torch.fx symbolic tracing it is False, and x is a Proxy whose
    # attributes must not be turned into a bool
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.onnx.is_in_onnx_export()
        and x.device.type == "cpu"
    )


# --------------------------------------------------------------------------------------------
# depthwise conv on channels-last maps


@torch.library.custom_op("biformer::depthwise_conv_nhwc", mutates_args=())
def _dwconv_nhwc(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    # (N, H, W, C) -> (N, H, W, C); the NCHW view of a contiguous NHWC map is channels_last
    y = F.conv2d(x.contiguous().permute(0, 3, 1, 2), weight, bias, padding=padding, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1).contiguous()


@_dwconv_nhwc.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("biformer::depthwise_conv_nhwc_backward", mutates_args=())
def _dwconv_nhwc_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> Tuple[Tensor, Tensor, Tensor]:
    c = x.shape[-1]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.contiguous().permute(0, 3, 1, 2), x.contiguous().permute(0, 3, 1, 2), weight, [c],
        [1, 1], [padding, padding], [1, 1], False, [0, 0], c, [True, True, True],
    )
    return gx.permute(0, 2, 3, 1).contiguous(), gw, gb


@_dwconv_nhwc_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> Tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _dwconv_setup(ctx, inputs, output) -> None:
    x, weight, _, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = padding


def _dwconv_grad(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    gx, gw, gb = _dwconv_nhwc_backward(grad, x, weight, ctx.padding)
    return gx, gw, gb, None


_dwconv_nhwc.register_autograd(_dwconv_grad, setup_context=_dwconv_setup)


def depthwise_conv_nhwc(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A depthwise ``conv`` (stride 1, 'same' padding) on an ``(N, H, W, C)`` map, returned NHWC.

    Eager: the conv on the channels_last view (a dense NHWC input keeps the backward on mkldnn's fast
    path). Compiled: the same code as an opaque custom op (see the module docstring).
    """
    if use_compiled_ops(x) and conv.bias is not None:
        return _dwconv_nhwc(x, conv.weight, conv.bias, conv.padding[0])
    return conv(x.contiguous().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------
# routed SDPA (the sdpa backend's formulation, as an opaque op)


def _grid(sizes: List[int]) -> RegionGrid:
    return RegionGrid(*sizes)


def _routed(x: Tensor, rows: Tensor, batch_regions: int, heads: int) -> Tensor:
    """``(N, H, W, C)`` -> ``(N*P, h, k*T, C/h)``: the routed rows, last dim contiguous."""
    c = x.shape[-1]
    picked = x.reshape(-1, c).index_select(0, rows)  # (N*P*k*T, C)
    return picked.view(batch_regions, -1, heads, c // heads).transpose(1, 2)


@torch.library.custom_op("biformer::routed_sdpa", mutates_args=())
def _routed_sdpa(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, mask: Optional[Tensor], grid: List[int], heads: int, scale: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns SDPA's output and logsumexp, and its operands for the backward (as eager SDPA keeps them)."""
    g = _grid(grid)
    qr = query_regions(q, g, heads)  # (N*P, h, T, dq) laid out (N*P, T, h, dq)
    if qr.untyped_storage().data_ptr() == q.untyped_storage().data_ptr():  # a view (one region): outputs must not alias
        qr = qr.clone()
    batch_regions = qr.shape[0]
    kr = _routed(k, rows, batch_regions, heads)  # (N*P, h, kT, dq) laid out (N*P, kT, h, dq)
    vr = _routed(v, rows, batch_regions, heads)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qr, kr, vr, attn_mask=mask, scale=scale)
    return out, lse, qr, kr, vr  # out (N*P, h, T, dv) laid out (N*P, T, h, dv); lse (N*P, h, T)


def _heads_minor(batch_regions: int, tokens: int, heads: int, width: int, like: Tensor) -> Tensor:
    """An empty ``(B, h, tokens, width/h)`` tensor laid out ``(B, tokens, h, width/h)``."""
    return like.new_empty(batch_regions, tokens, heads, width // heads).transpose(1, 2)


@_routed_sdpa.register_fake
def _(q, k, v, rows, mask, grid, heads, scale):
    g = _grid(grid)
    b, t = q.shape[0] * g.num_regions, g.region_tokens
    kt = rows.shape[0] // b
    out = _heads_minor(b, t, heads, v.shape[-1], v)
    lse = torch.empty(b, t, heads, dtype=torch.float32, device=q.device).transpose(1, 2)
    return out, lse, _heads_minor(b, t, heads, q.shape[-1], q), _heads_minor(b, kt, heads, k.shape[-1], k), \
        _heads_minor(b, kt, heads, v.shape[-1], v)


@torch.library.custom_op("biformer::routed_sdpa_backward", mutates_args=())
def _routed_sdpa_backward(
    grad: Tensor, qr: Tensor, kr: Tensor, vr: Tensor, out: Tensor, lse: Tensor, rows: Tensor, mask: Optional[Tensor],
    q_shape: List[int], k_width: int, grid: List[int], scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    from .gather import regions_to_map

    g = _grid(grid)
    grad = grad.transpose(1, 2).contiguous().transpose(1, 2)  # the layout SDPA produced `out` in
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, qr, kr, vr, out, lse, 0.0, False, attn_mask=mask, scale=scale,
    )
    n, height, width = q_shape[:3]

    def scatter(d: Tensor) -> Tensor:  # (N*P, h, kT, d) -> (N, H, W, C), summed over the routed copies
        c = d.shape[1] * d.shape[3]
        rows_grad = d.transpose(1, 2).reshape(-1, c)
        return d.new_zeros(n * height * width, c).index_add_(0, rows, rows_grad).view(n, height, width, c)

    return regions_to_map(dq, g, n).contiguous(), scatter(dk), scatter(dv)


@_routed_sdpa_backward.register_fake
def _(grad, qr, kr, vr, out, lse, rows, mask, q_shape, k_width, grid, scale):
    n, height, width, c_qk = q_shape
    return (qr.new_empty(n, height, width, c_qk), kr.new_empty(n, height, width, k_width),
            vr.new_empty(n, height, width, vr.shape[1] * vr.shape[3]))


def _routed_sdpa_setup(ctx, inputs, output) -> None:
    q, k, v, rows, mask, grid, heads, scale = inputs
    out, lse, qr, kr, vr = output
    ctx.save_for_backward(qr, kr, vr, out, lse, rows, mask)
    ctx.q_shape, ctx.k_width, ctx.grid, ctx.scale = list(q.shape), k.shape[-1], grid, scale


def _routed_sdpa_grad(ctx, grad_out: Tensor, *unused_grads: Optional[Tensor]):
    qr, kr, vr, out, lse, rows, mask = ctx.saved_tensors
    dq, dk, dv = _routed_sdpa_backward(grad_out, qr, kr, vr, out, lse, rows, mask, ctx.q_shape, ctx.k_width,
                                       ctx.grid, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_routed_sdpa.register_autograd(_routed_sdpa_grad, setup_context=_routed_sdpa_setup)


def routed_sdpa_op(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    """The ``sdpa`` backend as one opaque op: ``(N, H, W, C)`` maps in, ``(N, H, W, C_v)`` out."""
    from .gather import regions_to_map

    grid = routing.grid
    n = q.shape[0]
    rows = routed_rows(routing, n)
    mask = routed_key_valid(routing, q.device)
    if mask is not None:  # the CPU flash kernel takes an additive float mask
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        mask = mask.view(n * grid.num_regions, 1, 1, -1)
    sizes = [grid.height, grid.width, grid.rows, grid.cols, grid.region_h, grid.region_w]
    out = _routed_sdpa(q, k, v, rows, mask, sizes, num_heads, scale)[0]
    return regions_to_map(out, grid, n)
