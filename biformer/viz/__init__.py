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
from .._lazy import lazy_exports

# Loaded on first use: the submodules import torch, and ``biformer visualize --help`` must not.
_WHERE = {
    "CapturedLayer": "capture", "RoutingCapture": "capture", "routed_layers": "capture",
    "UNTRAINED_NOTE": "figures", "QueryView": "figures", "QueryVisualization": "figures",
    "RoutingFrequency": "figures", "UntrainedModelWarning": "figures", "default_queries": "figures",
    "routing_statistics": "figures", "visualize_queries": "figures", "visualize_routing_frequency": "figures",
    "BUNDLED_IMAGES": "images", "load_image": "images", "model_input": "images",
}


__getattr__ = lazy_exports(__name__, _WHERE)


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
