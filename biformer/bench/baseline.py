"""What ``biformer bench`` compares our BRA against, written on the weights of our own layer.

* :func:`original_bra`: the original BiFormer algorithm (Zhu et al., 2023), step by step: q and kv
  from one linear, region means of q and k (detached) routed by ``(q_win * scale) @ k_win^T`` and
  top-k, key/value regions gathered from a ``P``-times ``expand()``-ed kv, then an explicit
  ``softmax((q * scale) @ k^T) @ v``. It is the baseline every speed and memory ratio is taken
  against, so it stays as the original wrote it, costs and all.
* :func:`use_original_bra`: the whole original model, by swapping every BRA module's forward for
  :func:`original_bra` (same weights).
* :func:`full_attention`: the same layer with plain attention over the whole map (no routing).
* :func:`original_bra_peak_bytes`: an analytic peak-memory estimate of :func:`original_bra`, for maps
  where running it would not fit in memory.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import BiLevelRoutingAttention

__all__ = ["original_bra", "use_original_bra", "full_attention", "original_bra_peak_bytes"]


def _layer_input(layer: BiLevelRoutingAttention, x: Tensor) -> Tensor:
    """The layer's input as ``(N, H, W, C)``, whatever its layout."""
    x = x.permute(0, 2, 3, 1) if layer.layout == "NCHW" else x
    if x.dim() != 4 or x.shape[-1] != layer.dim:
        raise ValueError(f"expected a {layer.layout} map with {layer.dim} channels, got shape {tuple(x.shape)}")
    return x


def _layer_output(layer: BiLevelRoutingAttention, out: Tensor, v: Tensor) -> Tensor:
    """LCE on ``v`` (both ``(N, H, W, C)``), the output projection, and the layer's layout."""
    if layer.lce is not None:
        out = out + layer.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = layer.proj(out)
    return out.permute(0, 3, 1, 2) if layer.layout == "NCHW" else out


def original_bra(layer: BiLevelRoutingAttention, x: Tensor) -> Tensor:
    """The original BiFormer BRA forward on ``layer``'s weights; same input/output as ``layer(x)``.

    Like the original (without its ``auto_pad``), the map must be a multiple of ``n_win``.
    """
    if layer.n_win is None:
        raise ValueError(f"the original algorithm takes n_win regions per side, got region_size={layer.region_size}")
    x = _layer_input(layer, x)
    n, h, w, c = x.shape
    s = layer.n_win
    if h % s or w % s:
        raise ValueError(f"the original algorithm needs the map to be a multiple of n_win={s}, got {h}x{w}")
    qk, m, rh, rw = layer.qk_dim, layer.num_heads, h // s, w // s
    p2, w2, c_kv = s * s, rh * rw, qk + c

    # cut into regions first, then project, as the original does
    x = x.view(n, s, rh, s, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, p2, rh, rw, c)  # (n, p2, rh, rw, c)
    q, kv = layer.qkv(x).split([qk, c_kv], dim=-1)  # (n, p2, rh, rw, qk), (n, p2, rh, rw, qk + c)
    q_pix = q.reshape(n, p2, w2, qk)
    kv_pix = kv.reshape(n, p2, w2, c_kv)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])  # (n, p2, qk) each
    v_map = kv[..., qk:].reshape(n, s, s, rh, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)

    # region routing on detached means; the routing weights are computed but unused, as in the original
    logits = (q_win.detach() * layer.scale) @ k_win.detach().transpose(-2, -1)  # (n, p2, p2)
    topk_logits, r_idx = torch.topk(logits, k=layer.topk, dim=-1)  # (n, p2, topk)
    _ = topk_logits.softmax(dim=-1)

    # gather routed key/value regions from a p2-times expanded view of kv
    kv_sel = torch.gather(
        kv_pix.view(n, 1, p2, w2, c_kv).expand(-1, p2, -1, -1, -1),
        dim=2,
        index=r_idx.view(n, p2, layer.topk, 1, 1).expand(-1, -1, -1, w2, c_kv),
    )  # (n, p2, topk, w2, qk + c)
    k_sel, v_sel = kv_sel.split([qk, c], dim=-1)
    k_sel = k_sel.reshape(n * p2, layer.topk * w2, m, qk // m).permute(0, 2, 3, 1)  # (n p2, m, d, topk w2)
    v_sel = v_sel.reshape(n * p2, layer.topk * w2, m, c // m).transpose(1, 2)  # (n p2, m, topk w2, dv)
    q_pix = q_pix.reshape(n * p2, w2, m, qk // m).transpose(1, 2)  # (n p2, m, w2, d)

    attn = ((q_pix * layer.scale) @ k_sel).softmax(dim=-1)  # (n p2, m, w2, topk w2)
    out = attn @ v_sel  # (n p2, m, w2, dv)
    out = out.view(n, s, s, m, rh, rw, c // m).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, h, w, c)
    return _layer_output(layer, out, v_map)


def full_attention(layer: BiLevelRoutingAttention, x: Tensor) -> Tensor:
    """``layer`` with its routed attention replaced by SDPA over the whole map (same projections, LCE)."""
    x = _layer_input(layer, x)
    n, h, w, c = x.shape
    m = layer.num_heads
    q, k, v = layer.qkv(x).split([layer.qk_dim, layer.qk_dim, c], dim=-1)

    def heads(t: Tensor) -> Tensor:  # (N, H, W, m*d) -> (N, m, HW, d)
        return t.reshape(n, h * w, m, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=layer.scale)  # (N, m, HW, dv)
    out = out.transpose(1, 2).reshape(n, h, w, c)
    return _layer_output(layer, out, v)


LayerForward = Callable[[BiLevelRoutingAttention, Tensor], Tensor]


def use_original_bra(model: nn.Module, forward: LayerForward = original_bra) -> int:
    """Make every :class:`BiLevelRoutingAttention` in ``model`` (in place) run ``forward`` instead.

    Returns how many modules were swapped; the weights are untouched. Deep-copy first to keep ours.
    """
    swapped = 0
    for module in model.modules():
        if isinstance(module, BiLevelRoutingAttention):
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
            swapped += 1
    return swapped


def original_bra_peak_bytes(
    batch: int,
    height: int,
    width: int,
    dim: int,
    *,
    qk_dim: int,
    num_heads: int,
    n_win: int,
    topk: int,
    backward: bool = True,
    element_size: int = 4,
) -> int:
    """Estimated peak tensor memory of :func:`original_bra` (forward, or forward + backward), in bytes.

    The map is taken as padded to a multiple of ``n_win`` (the original's ``auto_pad``). Counts the
    input, the live activations and the largest transient of each phase:

    * forward: logits and their softmax, both ``(N*P, heads, T, topk*T)``, exist together;
    * backward, attention: the saved softmax, its gradient and the logits' gradient (3 such);
    * backward, gather: the gradient of the ``expand()``-ed kv, ``(N, P, P, T, C_qk + C)``, P times kv.
    """
    rows, cols = -(-height // n_win), -(-width // n_win)
    p2, t = n_win * n_win, rows * cols
    tokens = p2 * t
    c_kv = qk_dim + dim
    attn = batch * p2 * num_heads * t * topk * t  # one attention-matrix-sized tensor
    routed = batch * p2 * topk * t * c_kv  # gathered k and v
    # kept through the layer: input, qkv output, region-ordered v for LCE, LCE output, attention output
    kept = batch * tokens * (dim + (qk_dim + c_kv) + dim + dim + dim)
    if not backward:
        return element_size * (kept + routed + 2 * attn)
    expanded_grad = batch * p2 * tokens * c_kv
    # gradients of the kept activations are about the size of the activations themselves
    return element_size * (2 * kept + routed + max(3 * attn, expanded_grad + routed))
