"""BRA backends, one file each (the NATTEN layout).

Every backend module exposes ``NAME``, the backend function
``(q, k, v, routing, num_heads, scale) -> (N, H, W, C_v)`` on channels-last maps, and
``can_run(q, k, v, grid, topk, num_heads) -> Optional[str]``: None when it can take the call, else
the reason it cannot. With ``q = k = v = None`` it answers for this machine alone. The dispatcher
(:func:`biformer.ops.bi_level_routing_attention`) and :func:`biformer.ops.available_backends`
both ask ``can_run``, and :class:`~biformer.ops.BackendUnavailable` carries its reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from torch import Tensor

from ..regions import RegionGrid, Routing
from . import dense, flex, reference, sdpa

BackendFn = Callable[[Tensor, Tensor, Tensor, Routing, int, float], Tensor]
CanRun = Callable[
    [Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[RegionGrid], Optional[int], Optional[int]],
    Optional[str],
]


@dataclass(frozen=True)
class Backend:
    name: str
    run: BackendFn
    can_run: CanRun
    auto: bool  # whether backend="auto" may pick it (by the cost model in biformer.ops.cost)


BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(reference.NAME, reference.reference_backend, reference.can_run, auto=False),
        Backend(sdpa.NAME, sdpa.sdpa_backend, sdpa.can_run, auto=True),
        Backend(dense.NAME, dense.dense_backend, dense.can_run, auto=True),
        Backend(flex.NAME, flex.flex_backend, flex.can_run, auto=False),
    )
}

__all__ = ["Backend", "BACKENDS", "BackendFn", "CanRun"]
