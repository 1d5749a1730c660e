"""Functional Bi-Level Routing Attention and its building blocks."""
from .bra import (
    BackendUnavailable,
    available_backends,
    bi_level_routing_attention,
    bi_level_routing_attention_3d,
    gather_routed,
    routed_attention_weights,
    select_backend,
)
from .regions import RegionGrid, Routing, resolve_grid, resolve_grid_nd, route

__all__ = [
    "BackendUnavailable",
    "RegionGrid",
    "Routing",
    "available_backends",
    "bi_level_routing_attention",
    "bi_level_routing_attention_3d",
    "gather_routed",
    "resolve_grid",
    "resolve_grid_nd",
    "routed_attention_weights",
    "route",
    "select_backend",
]
