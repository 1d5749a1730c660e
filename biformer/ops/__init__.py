"""Functional Bi-Level Routing Attention and its building blocks."""
from .bra import (
    BackendUnavailable,
    available_backends,
    bi_level_routing_attention,
    gather_routed,
    routed_attention_weights,
    select_backend,
)
from .regions import RegionGrid, Routing, resolve_grid, route

__all__ = [
    "BackendUnavailable",
    "RegionGrid",
    "Routing",
    "available_backends",
    "bi_level_routing_attention",
    "gather_routed",
    "resolve_grid",
    "routed_attention_weights",
    "route",
    "select_backend",
]
