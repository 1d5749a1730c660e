"""Semantic segmentation with a BiFormer backbone: UperNet and Semantic FPN.

    from biformer.segmentation import upernet
    model = upernet("biformer_small", num_classes=150, pretrained_backbone="biformer_small.safetensors")
    logits = model(images)  # (B, 3, H, W) in [0, 1] -> (B, 150, H, W)

See :mod:`biformer.segmentation.models`, and ``biformer segment --help`` for the CLI.
"""
import importlib
from typing import Any

# Loaded on first use: the submodules import torch, and ``biformer segment --help`` must not.
_WHERE = {
    "ADE20K_CLASSES": "data", "SegmentationFolder": "data", "evaluate_miou": "engine", "overlay": "engine",
    "BUILDERS": "models", "FCNHead": "models", "FPNHead": "models", "Segmentor": "models", "UPerHead": "models",
    "load_segmentor": "models", "save_segmentor": "models", "semantic_fpn": "models", "upernet": "models",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ADE20K_CLASSES",
    "BUILDERS",
    "FCNHead",
    "FPNHead",
    "Segmentor",
    "SegmentationFolder",
    "UPerHead",
    "evaluate_miou",
    "load_segmentor",
    "overlay",
    "save_segmentor",
    "semantic_fpn",
    "upernet",
]
