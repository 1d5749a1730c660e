"""Semantic segmentation with a BiFormer backbone: UperNet and Semantic FPN.

    from biformer.segmentation import upernet
    model = upernet("biformer_small", num_classes=150, pretrained_backbone="biformer_small.safetensors")
    logits = model(images)  # (B, 3, H, W) in [0, 1] -> (B, 150, H, W)

See :mod:`biformer.segmentation.models`, and ``biformer segment --help`` for the CLI.
"""
from .data import ADE20K_CLASSES, SegmentationFolder
from .engine import evaluate_miou, overlay
from .models import BUILDERS, FCNHead, FPNHead, Segmentor, UPerHead, load_segmentor, save_segmentor, semantic_fpn, upernet

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
