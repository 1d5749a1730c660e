"""Semantic segmentation with a BiFormer backbone: UperNet and Semantic FPN.

    from biformer.segmentation import upernet
    model = upernet("biformer_small", num_classes=150, pretrained_backbone="biformer_small.safetensors")
    logits = model(images)  # (B, 3, H, W) in [0, 1] -> (B, 150, H, W)

See :mod:`biformer.segmentation.models`, and ``biformer segment --help`` for the CLI.
"""
from .._lazy import lazy_exports

# Loaded on first use: the submodules import torch, and ``biformer segment --help`` must not.
_WHERE = {
    "ADE20K_CLASSES": "data", "SegmentationFolder": "data", "evaluate_miou": "engine", "overlay": "engine",
    "BUILDERS": "models", "FCNHead": "models", "FPNHead": "models", "Segmentor": "models", "UPerHead": "models",
    "load_segmentor": "models", "save_segmentor": "models", "semantic_fpn": "models", "upernet": "models",
}


__getattr__ = lazy_exports(__name__, _WHERE)


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
