"""Object detection and instance segmentation with a BiFormer backbone, on torchvision's detectors.

    from biformer.detection import mask_rcnn, retinanet
    model = mask_rcnn("biformer_small", num_classes=80, pretrained_backbone="biformer_small.safetensors")

See :mod:`biformer.detection.models` for the conventions, and ``biformer detect --help`` for the CLI.
"""
from .data import CocoDetection
from .engine import draw_detections, evaluate_coco
from .models import BUILDERS, BiFormerFPN, BiFormerRetinaNet, load_detector, mask_rcnn, retinanet, save_detector

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
