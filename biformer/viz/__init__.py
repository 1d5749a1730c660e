"""See the routing: capture hooks and figures of where BiFormer's queries route and attend.

Python API (for notebooks)::

    import timm, biformer
    from biformer.viz import visualize_queries, visualize_routing_frequency
    model, _ = biformer.checkpoint.load_model("model.safetensors")
    result = visualize_queries(model, "astronaut", queries=[(250, 120)], stage=3)
    result.figure                      # matplotlib Figure
    result.queries[0].routed           # routed regions, best first
    result.queries[0].attention        # (heads, H, W) attention map, NaN outside routed tokens

Command line: ``biformer visualize astronaut --output out.png``.
"""
from .capture import CapturedLayer, RoutingCapture, routed_layers
from .figures import (
    UNTRAINED_NOTE,
    QueryView,
    QueryVisualization,
    RoutingFrequency,
    UntrainedModelWarning,
    default_queries,
    routing_statistics,
    visualize_queries,
    visualize_routing_frequency,
)
from .images import BUNDLED_IMAGES, load_image, model_input

__all__ = [
    "BUNDLED_IMAGES",
    "CapturedLayer",
    "QueryView",
    "QueryVisualization",
    "RoutingCapture",
    "RoutingFrequency",
    "UNTRAINED_NOTE",
    "UntrainedModelWarning",
    "default_queries",
    "load_image",
    "model_input",
    "routed_layers",
    "routing_statistics",
    "visualize_queries",
    "visualize_routing_frequency",
]
