"""The attention kernel the ``sdpa`` and ``dense`` backends call on their blocks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def explicit_kernel_preferred(q: Tensor) -> bool:
    """bf16/fp16 on the CPU: there SDPA's flash kernel on BRA's small blocks (4-196 queries) ran up
    to 1.3x slower in inference and 1.7-4x slower in training than a matmul + softmax, whose bf16
    matmuls use the CPU's bf16 dot-product instructions (BiFormer-S layers, batch 8, 2 threads)."""
    return q.device.type == "cpu" and q.dtype in _LOW_PRECISION


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """``softmax(scale * q k^T + mask) v`` over ``(..., L, d)`` blocks; ``mask`` is bool (True: attend)
    or additive, broadcast over the logits.

    SDPA where it is fastest; else the explicit form, computed as the ``reference`` backend does
    (logits and weights rounded to q's dtype; the matmuls accumulate and softmax reduces in float32).
    Keeping the logits in float32 as SDPA's flash kernel does costs about 2x in training here.
    """
    if not explicit_kernel_preferred(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    logits = (q * scale) @ k.transpose(-1, -2)  # (..., L, S)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(dim=-1) @ v
