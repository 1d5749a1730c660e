"""``reference``: cut into regions, gather the routed regions, explicit softmax. The ground truth."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..gather import gather_routed, routed_key_valid
from ..regions import RegionGrid, Routing, from_regions, to_regions

NAME = "reference"


def routed_logits(qr: Tensor, kr: Tensor, routing: Routing, scale: float) -> Tensor:
    """``(N, P, h, T, k*T)`` logits of every query token against its routed key tokens; padded keys -inf."""
    k_sel = gather_routed(kr, routing.indices)  # (N, P, h, kT, dq)
    logits = (qr * scale) @ k_sel.transpose(-1, -2)  # (N, P, h, T, kT)
    key_valid = routed_key_valid(routing, qr.device)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, :, None, None, :], float("-inf"))
    return logits


def reference_backend(q: Tensor, k: Tensor, v: Tensor, routing: Routing, num_heads: int, scale: float) -> Tensor:
    grid = routing.grid
    qr, kr, vr = (to_regions(t, grid, num_heads) for t in (q, k, v))  # (N, P, h, T, d)
    weights = routed_logits(qr, kr, routing, scale).softmax(dim=-1)  # (N, P, h, T, kT)
    v_sel = gather_routed(vr, routing.indices)  # (N, P, h, kT, dv)
    return from_regions(weights @ v_sel, grid)


def can_run(q: Optional[Tensor], k: Optional[Tensor], v: Optional[Tensor], grid: Optional[RegionGrid],
            topk: Optional[int], num_heads: Optional[int]) -> Optional[str]:
    return None  # plain tensor ops: every device, dtype and mode
