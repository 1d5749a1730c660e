"""NaN and ±inf in the fast backends, placed exactly where the ``reference`` backend puts them.

The fast kernels leak or hide non-finite values: ``dense`` multiplies masked-out (zero) weights by
a NaN ``v`` and adds its -inf mask to a NaN or +inf logit of a key the query never routed to;
SDPA read padded key slots from the nearest real token; compiled flex returns finite numbers for a
NaN query. Each backend therefore adds :func:`nonfinite_term` to its output: 0 where
``reference`` is finite, NaN or ±inf where it is not (``finite + NaN = NaN``). ``sdpa`` and
``flex`` see only the routed tokens, so they keep their raw inputs and the term only restores what
a kernel may hide; ``dense`` first replaces non-finite inputs by 0 (:func:`sanitise`) so that
nothing leaks through its mask. The term is tensor arithmetic on per-region maxima (no
``.item()``, no branch on data), so it compiles into one graph and never stalls a GPU. Only in
eager mode on the CPU, where reading a value costs no device sync, :func:`may_be_nonfinite` skips
it for inputs whose sums are finite (the term costs 10-20% of a CPU forward; three sums ~1%).

What ``reference`` does, and the rule used here (``i`` a query token, ``h`` a head, ``c`` a
channel of ``v``, "routed" = in a key region that ``i``'s region routes to):

* a non-finite ``q[i, h]`` makes every logit of the row NaN or ±inf, so row ``(i, h)`` is NaN;
* a NaN ``k[j, h]`` at a routed token makes row ``(i, h)`` NaN;
* a ±inf ``k[j, h]`` makes the logit ±inf by the sign of ``q . k`` (a NaN row for +inf, weight 0
  for -inf). ``sdpa`` and ``flex`` compute this themselves (``keep_inf_keys=True``). ``dense``
  cannot: its mask is added to every logit of the map, so it gets ±inf keys replaced by 0 and any
  routed ±inf key makes the row NaN, a superset of ``reference``'s NaN rows (exact signs would
  cost a second full ``q . k`` product);
* a routed NaN ``v[j, c]`` makes channel ``c`` NaN (even at weight 0); routed +inf and -inf in
  channel ``c`` make it NaN, only +inf makes it +inf, only -inf makes it -inf. (Where a weight is
  exactly 0, ``reference`` gives NaN instead of ±inf; which weights underflow to 0 differs between
  kernels, so that case is not well-defined.)

Compiled or exported (``torch.compile``, ``torch.export``, ONNX), ``dense`` does not sanitise its
inputs, so a non-finite key or value in a region the query did not route to also makes the row NaN:
a superset of ``reference``'s NaN rows. No backend ever returns a finite value where ``reference``
does not.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .regions import RegionGrid, Routing, _interleave, pad_map

_NAN = float("nan")
_INF = float("inf")


def may_be_nonfinite(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a backend must add :func:`nonfinite_term`: always when compiling or off the CPU
    (a data-dependent branch would break the graph or wait for the GPU), else unless the inputs
    are finite: their min and max (which propagate NaN and keep ±inf) are, in one pass with no
    upcast copy of a bf16/fp16 map and no fp16 overflow."""
    if torch.compiler.is_compiling() or q.device.type != "cpu":
        return True
    return not all(bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()) for t in (q, k, v))


def _inputs_nonfinite(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """0-d bool tensor: some input may hold NaN or ±inf (a finite sum proves they do not).

    Sums rather than min/max here: this runs in compiled graphs and in ONNX Runtime, whose max
    reductions need not propagate NaN. float16 sums in float32 (its own range ends at 65504)."""
    def checksum(x: Tensor) -> Tensor:
        return x.sum(dtype=torch.float32) if x.dtype == torch.float16 else x.sum().float()

    return ~torch.isfinite(checksum(q) + checksum(k) + checksum(v))


def nonfinite_guard(
    q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, *, keep_inf_keys: bool
) -> Optional[Tensor]:
    """:func:`nonfinite_term` where it may be non-zero, else None (nothing to add).

    * eager on the CPU: computed only when :func:`may_be_nonfinite` says so;
    * compiled or exported on the CPU: a graph-level branch (``torch.cond``; an ``If`` node in ONNX)
      computes it only for non-finite inputs, so finite inputs pay three sums instead of the term
      (which cost a quarter of BiFormer-S's time in ONNX Runtime). The branch takes copies of ``q``,
      ``k`` and ``v``: ``torch.cond`` refuses operands that share memory, as a fused qkv
      projection's slices do;
    * on other devices: always computed, since reading the branch condition would wait for the device.

    The term carries no gradient: it is 0 wherever the output is finite.
    """
    if not torch.compiler.is_compiling():
        return nonfinite_term(q, k, v, routing, num_heads, keep_inf_keys=keep_inf_keys) if may_be_nonfinite(q, k, v) else None
    if q.device.type != "cpu":
        return nonfinite_term(q, k, v, routing, num_heads, keep_inf_keys=keep_inf_keys)
    grid = routing.grid

    def term(q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> Tensor:
        found = nonfinite_term(q, k, v, Routing(indices, indices, grid), num_heads, keep_inf_keys=keep_inf_keys)
        # with symbolic sizes the term's shape is written differently from v's (h * (C // h)), and
        # both branches must return the same sizes and strides
        return torch.zeros_like(v) + found

    def no_term(q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> Tensor:
        return torch.zeros_like(v)

    operands = (q.detach().clone(), k.detach().clone(), v.detach().clone(), routing.indices)
    return torch.cond(_inputs_nonfinite(q, k, v), term, no_term, operands)


def sanitise(x: Tensor, keep_inf: bool = False) -> Tensor:
    """``x`` with NaN (and ±inf unless ``keep_inf``) replaced by 0."""
    if keep_inf:
        return torch.nan_to_num(x, nan=0.0, posinf=_INF, neginf=-_INF)
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _region_reduce(x: Tensor, grid: RegionGrid, largest: bool) -> Tensor:
    """Max (or min) over each region's tokens: ``(N, *size, C)`` -> ``(N, P, C)``; NaN propagates.

    Zero padding never turns a region's NaN or ±inf into something else, which is all we read.
    Two passes (along the innermost region axis, then over the others), as in ``region_means``: one
    reduction over non-adjacent dims is several times slower on the CPU.
    """
    n, c, k = x.shape[0], x.shape[-1], grid.ndim
    reduce = torch.amax if largest else torch.amin
    x = pad_map(x, grid).view(n, *_interleave(grid.counts, grid.region), c)
    x = reduce(x, dim=2 * k)  # (N, c1, r1, .., ck, C)
    return reduce(x, dim=tuple(range(2, 2 * k, 2))).reshape(n, grid.num_regions, c)


def _over_routed(per_region: Tensor, routing: Routing) -> Tensor:
    """Max over each query region's routed regions: ``(N, P, C)`` -> ``(N, P, C)``; NaN propagates."""
    n, p, topk = routing.indices.shape
    c = per_region.shape[-1]
    rows = (routing.indices + torch.arange(n, device=per_region.device).view(n, 1, 1) * p).reshape(-1)
    picked = per_region.reshape(n * p, c).index_select(0, rows).view(n, p, topk, c)  # (N, P, k, C)
    return picked.amax(2)


def nonfinite_term(
    q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, *, keep_inf_keys: bool
) -> Tensor:
    """``(N, *size, C_v)``: 0 where ``reference``'s output is finite, else its NaN or ±inf (see the module doc).

    ``keep_inf_keys``: the backend was given ±inf keys as they are (``sdpa``, ``flex``); otherwise a
    routed ±inf key makes the row NaN. Built from max/min reductions, which propagate NaN and keep
    ±inf, so no per-token flag tensors are materialised.
    """
    from .routing_rule import token_region

    grid = routing.grid
    n, c_v, tokens = v.shape[0], v.shape[-1], grid.tokens
    h, d_qk = num_heads, q.shape[-1] // num_heads
    zero = torch.zeros((), dtype=v.dtype, device=v.device)

    # keys: per token and head, NaN when the token makes a row that routes to it NaN
    k_heads = k.view(*k.shape[:-1], h, d_qk)
    k_peak = (k_heads if keep_inf_keys else k_heads.abs()).amax(-1)  # (N, *size, h): NaN (or inf) if any
    k_bad = ~torch.isfinite(k_peak) if not keep_inf_keys else torch.isnan(k_peak)
    k_flag = torch.where(k_bad, _NAN, zero)  # (N, *size, h)

    # one gather over the routed regions for everything: max of v, max of -v (min), key flags
    per_region = torch.cat([
        _region_reduce(v, grid, largest=True), -_region_reduce(v, grid, largest=False),
        _region_reduce(k_flag, grid, largest=True),
    ], dim=-1)  # (N, P, 2*C_v + h)
    v_max, v_neg_min, k_term = _over_routed(per_region, routing).split([c_v, c_v, h], dim=-1)
    v_term = torch.where(v_max == _INF, _INF, zero) + torch.where(v_neg_min == _INF, -_INF, zero)  # +inf + -inf = NaN
    v_term = torch.where(torch.isnan(v_max), _NAN, v_term)  # (N, P, C_v)

    region_term = v_term.view(n, -1, h, c_v // h) + k_term.unsqueeze(-1)  # (N, P, h, dv)
    token_term = region_term[:, token_region(grid, v.device)]  # (N, tokens, h, dv)
    # queries: x * 0 is NaN exactly when x is NaN or ±inf
    q_term = q.view(n, tokens, h, d_qk).abs().amax(-1, keepdim=True) * 0  # (N, tokens, h, 1)
    return (token_term + q_term.to(v.dtype)).view(v.shape)

