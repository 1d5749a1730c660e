"""``dense``: attention over the whole (unpadded) map with the routing as a token mask.

No copies and no padding, but ``P / topk`` times the routed multiply-adds: it pays off when
regions are tiny and ``topk`` is a large share of them (see :mod:`biformer.ops.cost`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernel import attention
from ..nonfinite import nonfinite_guard, sanitise
from ..regions import RegionGrid, Routing
from ..routing_rule import dense_token_bias

NAME = "dense"


def dense_backend(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    n, tokens, h = q.shape[0], routing.grid.tokens, num_heads
    # The mask is added to every logit of the map, so in eager no non-finite key or value may reach
    # the kernel. Compiled or exported graphs skip the sanitising (a quarter of dense's ops in ONNX):
    # there a non-finite key or value outside the routed regions makes the row NaN too, a superset
    # of reference's NaN rows; a finite output is still never reported where reference's is not.
    term = nonfinite_guard(q, k, v, routing, num_heads, keep_inf_keys=False)
    if term is not None and not torch.compiler.is_compiling():
        q, k, v = sanitise(q), sanitise(k), sanitise(v)

    def heads(x: Tensor) -> Tensor:  # (N, *size, C) -> (N, h, tokens, C/h), a view
        return x.reshape(n, tokens, h, x.shape[-1] // h).transpose(1, 2)

    out = attention(heads(q), heads(k), heads(v), dense_token_bias(routing, q.dtype), scale)
    out = out.transpose(1, 2).reshape(*v.shape)  # (N, h, tokens, dv) -> (N, *size, C_v)
    return out if term is None else out + term


def can_run(q: Optional[Tensor], k: Optional[Tensor], v: Optional[Tensor], grid: Optional[RegionGrid],
            topk: Optional[int], num_heads: Optional[int]) -> Optional[str]:
    return None  # SDPA with a boolean mask: every device, dtype and mode
