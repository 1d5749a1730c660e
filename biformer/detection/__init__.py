"""Object detection and instance segmentation with a BiFormer backbone, on torchvision's detectors.

    from biformer.detection import mask_rcnn, retinanet
    model = mask_rcnn("biformer_small", num_classes=80, pretrained_backbone="biformer_small.safetensors")

See :mod:`biformer.detection.models` for the conventions, and ``biformer detect --help`` for the CLI.
"""
import importlib
from typing import Any

# Loaded on first use: the submodules import torch, and ``biformer detect --help`` must not.
_WHERE = {
    "CocoDetection": "data", "draw_detections": "engine", "evaluate_coco": "engine", "BUILDERS": "models",
    "BiFormerFPN": "models", "BiFormerRetinaNet": "models", "load_detector": "models", "mask_rcnn": "models",
    "retinanet": "models", "save_detector": "models",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BUILDERS",
    "BiFormerFPN",
    "BiFormerRetinaNet",
    "CocoDetection",
    "draw_detections",
    "evaluate_coco",
    "load_detector",
    "mask_rcnn",
    "retinanet",
    "save_detector",
]
