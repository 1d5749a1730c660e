"""FlexAttention backend for Bi-Level Routing Attention.

Tokens are reordered region-major, so every region is one contiguous block of ``T`` tokens, and
the routing becomes a :class:`BlockMask` whose KV block indices are the routed regions.

Known traps of FlexAttention (torch 2.13/2.14), and the guard for each:

* Eager ``flex_attention`` ignores the block indices and applies only ``mask_mod``: our ``mask_mod``
  encodes the whole rule (routing and padding), so even an eager evaluation is right. We never
  compute with eager flex anyway (it materialises the full score matrix).
* Flex has no backward on the CPU: a CPU call that needs gradients is refused with that reason.
* Compiled flex silently returned wrong results after a compile that had failed, and once the
  recompile limit was hit (dynamo falls back to eager). We compile with ``fullgraph=True`` and our
  own ``recompile_limit``, so hitting the limit raises instead of falling back; any compile failure
  marks the backend unusable for the rest of the process, and every later call is refused.
* Inductor's CPU flex template fails to compile a BlockMask with full blocks (a C++ error about
  ``kv_indices``), so on the CPU every routed block is a partial block and ``mask_mod`` is applied.
* Dynamic-shape compilation of flex on the CPU fails or miscompiles for some shapes, so we
  compile per static shape.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import BackendUnavailable
from ..nonfinite import nonfinite_guard
from ..regions import RegionGrid, Routing, from_regions, to_regions
from ..routing_rule import region_major_mask_mod

NAME = "flex"

try:  # FlexAttention arrived in torch 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = None  # type: ignore[assignment,misc]
    flex_attention = None  # type: ignore[assignment]

RECOMPILE_LIMIT = 64  # distinct (shape, dtype, device) keys one process may compile

_compiled: Optional[Callable[..., Tensor]] = None
_broken_reason: Optional[str] = None


def routing_block_mask(routing: Routing) -> "BlockMask":
    """A BlockMask over region-major tokens: query block ``p`` sees exactly the KV blocks it routes to.

    ``mask_mod`` is the routing rule (:mod:`biformer.ops.routing_rule`) over region-major tokens, so
    the mask is correct even where flex evaluates ``mask_mod`` alone.
    """
    grid = routing.grid
    n, p, topk = routing.indices.shape
    t = grid.region_tokens
    device = routing.indices.device
    mask_mod = region_major_mask_mod(routing)
    allowed = torch.zeros(n, p, p, dtype=torch.int8, device=device).scatter_(2, routing.indices, 1)
    # kv_indices must list all P blocks per row; only the first kv_num_blocks are read
    unrouted = torch.argsort(allowed, dim=-1, descending=True, stable=True)
    kv_indices = torch.cat([routing.indices, unrouted[..., topk:]], dim=-1).to(torch.int32).unsqueeze(1)
    num_blocks = torch.full((n, 1, p), topk, dtype=torch.int32, device=device)

    # Partial blocks (mask_mod decides inside them) when routed blocks may hold padding, and always on
    # the CPU: inductor's CPU flex template fails to compile with full blocks (torch 2.14).
    if grid.is_padded or device.type == "cpu":
        return BlockMask.from_kv_blocks(
            num_blocks, kv_indices, BLOCK_SIZE=(t, t), mask_mod=mask_mod, seq_lengths=(p * t, p * t)
        )
    # nothing padded: every routed block is fully visible, so flex can skip mask_mod inside them
    no_partial = torch.zeros_like(num_blocks)
    return BlockMask.from_kv_blocks(
        no_partial, kv_indices, num_blocks, kv_indices, BLOCK_SIZE=(t, t), mask_mod=mask_mod,
        seq_lengths=(p * t, p * t),
    )


def can_run(q: Optional[Tensor], k: Optional[Tensor], v: Optional[Tensor], grid: Optional[RegionGrid],
            topk: Optional[int], num_heads: Optional[int]) -> Optional[str]:
    """Why flex cannot take this call (None if it can); with no tensors, only the machine is checked."""
    if flex_attention is None:
        return "backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)"
    if _broken_reason is not None:
        return (
            f"backend 'flex' is disabled for this process: {_broken_reason}. Compiled flex has returned "
            "wrong results after such a failure, so it is not used again; use backend='sdpa'"
        )
    if q is None or k is None or v is None:
        return None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        return (
            "backend 'flex' has no backward on the CPU (FlexAttention's CPU path is inference-only); "
            "use backend='sdpa' for training on the CPU"
        )
    if num_heads is not None and q.shape[-1] != v.shape[-1]:
        return (
            f"backend 'flex' needs equal q/k and v head widths, got {q.shape[-1] // num_heads} "
            f"and {v.shape[-1] // num_heads}"
        )
    return None


def _compiled_flex() -> Callable[..., Tensor]:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(
            flex_attention, dynamic=False, fullgraph=True, recompile_limit=RECOMPILE_LIMIT, isolate_recompiles=True
        )
    return _compiled


def _disable(reason: str) -> None:
    global _broken_reason
    _broken_reason = reason


def flex_backend(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    """Compiled FlexAttention over region-major tokens with a routing BlockMask."""
    grid = routing.grid
    n, p, h, t = q.shape[0], grid.num_regions, num_heads, grid.region_tokens

    def region_major(x: Tensor) -> Tensor:  # (N, H, W, C) -> (N, h, P*T, C/h)
        return to_regions(x, grid, h).transpose(1, 2).reshape(n, h, p * t, x.shape[-1] // h)

    reason = can_run(q, k, v, grid, routing.indices.shape[-1], num_heads)
    if reason is not None:
        raise BackendUnavailable(reason)
    # compiled flex returns finite numbers for a NaN query: the term puts reference's NaN/inf back
    term = nonfinite_guard(q, k, v, routing, num_heads, keep_inf_keys=True)
    block_mask = routing_block_mask(routing)
    try:
        out = _compiled_flex()(region_major(q), region_major(k), region_major(v), block_mask=block_mask, scale=scale)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        _disable(f"compiled flex_attention reached its limit of {RECOMPILE_LIMIT} compiled shapes ({e})")
        raise BackendUnavailable(
            f"backend 'flex' reached its limit of {RECOMPILE_LIMIT} compiled shapes in this process; "
            "beyond it dynamo would fall back to eager flex, which has given wrong results. Use backend='sdpa'"
        ) from e
    except Exception as e:  # a failed compile: never trust compiled flex again in this process
        _disable(f"a flex_attention compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        raise BackendUnavailable(f"backend 'flex' failed to compile for this input: {type(e).__name__}: {e}") from e
    out = out.view(n, h, p, t, -1).transpose(1, 2)  # (N, h, P*T, d) -> (N, P, h, T, d)
    out = from_regions(out, grid)
    return out if term is None else out + term
