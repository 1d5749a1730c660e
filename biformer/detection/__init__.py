"""Object detection and instance segmentation with a BiFormer backbone, on torchvision's detectors.

    from biformer.detection import mask_rcnn, retinanet
    model = mask_rcnn("biformer_small", num_classes=80, pretrained_backbone="biformer_small.safetensors")

See :mod:`biformer.detection.models` for the conventions, and ``biformer detect --help`` for the CLI.
"""
from .._lazy import lazy_exports

# Loaded on first use: the submodules import torch, and ``biformer detect --help`` must not.
_WHERE = {
    "CocoDetection": "data", "draw_detections": "engine", "evaluate_coco": "engine", "BUILDERS": "models",
    "BiFormerFPN": "models", "BiFormerRetinaNet": "models", "load_detector": "models", "mask_rcnn": "models",
    "retinanet": "models", "save_detector": "models",
}


__getattr__ = lazy_exports(__name__, _WHERE)


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
