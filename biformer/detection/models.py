"""RetinaNet and Mask R-CNN with a BiFormer + FPN backbone, as torchvision detection models.

The builders return plain torchvision models, so torchvision's conventions hold: in train mode
``model(images, targets)`` returns a dict of losses; in eval mode ``model(images)`` returns one dict
per image with ``boxes`` (x1, y1, x2, y2 in input pixels), ``labels``, ``scores`` and, for Mask R-CNN,
``masks`` (N, 1, H, W probabilities). Images are float RGB tensors in [0, 1] of any size; the model
normalises them and resizes the short side to ``min_size`` (long side at most ``max_size``).

Labels are ``1..num_classes``; 0 is the background (both models reserve it, as torchvision does).

Defaults mirror the paper's COCO 1x setups (mmdetection 2.x): ``n_win=16``, drop path 0.2, BatchNorm
frozen (``norm_eval``), 800x1333 inputs; RetinaNet's FPN starts at stride 8 with P6/P7 computed from
the last backbone map, and keeps 100 detections per image.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn
from torch import Tensor
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..errors import UserValueError
from ..backbone import BiFormerBackbone, PathLike
from ..checkpoint import load_task_model, save_task_model

__all__ = ["BiFormerFPN", "BiFormerRetinaNet", "retinanet", "mask_rcnn", "BUILDERS", "save_detector", "load_detector"]

TASK = "detection"


class BiFormerFPN(nn.Module):
    """BiFormer stages -> FPN. Returns an ordered dict of maps, all with ``out_channels`` channels.

    ``in_levels`` picks the backbone stages the FPN takes (0..3 = strides 4..32). ``extra`` adds
    coarser levels: ``"pool"`` (a stride-2 max pool of the last level, Mask R-CNN) or ``"p6p7"``
    (two stride-2 convs from the last *backbone* map, RetinaNet).
    """

    def __init__(
        self,
        backbone: BiFormerBackbone,
        in_levels: Sequence[int] = (0, 1, 2, 3),
        out_channels: int = 256,
        extra: Optional[str] = "pool",
    ) -> None:
        super().__init__()
        if not set(in_levels) <= set(backbone.out_indices):
            raise UserValueError(f"got in_levels={tuple(in_levels)}, but the backbone outputs stages {backbone.out_indices}")
        self.body = backbone
        self.in_levels = tuple(in_levels)
        self._take = [backbone.out_indices.index(i) for i in self.in_levels]
        in_channels = [backbone.out_channels[i] for i in self._take]
        if extra == "pool":
            extra_block: Optional[nn.Module] = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7(in_channels[-1], out_channels)
            extra_block.use_P5 = False  # P6 from C5 whatever the widths ("on_input", as in the paper)
        elif extra is None:
            extra_block = None
        else:
            raise UserValueError(f"got extra={extra!r}, expected 'pool', 'p6p7' or None")
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), feats[j]) for i, j in enumerate(self._take)))


class BiFormerRetinaNet(RetinaNet):
    """torchvision's RetinaNet, but class 0 (the background slot torchvision reserves) is never reported.

    RetinaNet scores each class with its own sigmoid, so the reserved slot is just one more class that
    no anchor is ever assigned to. Trained, it scores low; untrained or with a low ``score_thresh``,
    torchvision would still report it as label 0. Its logits are set to -inf before torchvision's
    post-processing, so its score is 0 and it never passes the (strict, non-negative) threshold.
    """

    def postprocess_detections(self, head_outputs, anchors, image_shapes):  # type: ignore[override]
        logits = [level.clone() for level in head_outputs["cls_logits"]]  # (N, HWA, K + 1) per level
        for level in logits:
            level[..., 0] = float("-inf")
        return super().postprocess_detections({**head_outputs, "cls_logits": logits}, anchors, image_shapes)


def _backbone(
    backbone: str,
    pretrained_backbone: Optional[PathLike],
    n_win: int,
    drop_path_rate: float,
    norm_eval: bool,
    frozen_stages: int,
    backbone_kwargs: Optional[Dict[str, Any]],
) -> BiFormerBackbone:
    return BiFormerBackbone(
        backbone,
        n_win=n_win,
        pretrained=pretrained_backbone,
        norm_eval=norm_eval,
        frozen_stages=frozen_stages,
        drop_path_rate=drop_path_rate,
        **(backbone_kwargs or {}),
    )


def _record(model: nn.Module, builder: str, kwargs: Dict[str, Any]) -> nn.Module:
    # what save_detector stores to rebuild the model; the pretrained path is not needed once trained
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained_backbone"}
    model.build_config = {"builder": builder, "kwargs": kwargs}
    return model


def retinanet(
    backbone: str = "biformer_small",
    num_classes: int = 80,
    *,
    pretrained_backbone: Optional[PathLike] = None,
    n_win: int = 16,
    drop_path_rate: float = 0.2,
    norm_eval: bool = True,
    frozen_stages: int = -1,
    fpn_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    **detector_kwargs: Any,
) -> RetinaNet:
    """RetinaNet with BiFormer + FPN (P3-P7). ``detector_kwargs`` go to ``torchvision...RetinaNet``
    (e.g. ``score_thresh``, ``nms_thresh``, ``detections_per_img``).

    Paper (COCO 1x, 12 epochs, AdamW lr 1e-4, weight decay 1e-4): BiFormer-S 45.9 AP, BiFormer-B 47.1 AP.
    """
    kwargs = dict(locals())
    kwargs.update(kwargs.pop("detector_kwargs"))
    body = _backbone(backbone, pretrained_backbone, n_win, drop_path_rate, norm_eval, frozen_stages, backbone_kwargs)
    fpn = BiFormerFPN(body, in_levels=(1, 2, 3), out_channels=fpn_channels, extra="p6p7")
    detector_kwargs.setdefault("detections_per_img", 100)
    if detector_kwargs.get("score_thresh", 0.05) < 0:
        raise UserValueError(f"got score_thresh={detector_kwargs['score_thresh']}, expected a score >= 0")
    # torchvision's convention: labels 1..K, with slot 0 reserved (never reported, see BiFormerRetinaNet)
    model = BiFormerRetinaNet(fpn, num_classes + 1, min_size=min_size, max_size=max_size, **detector_kwargs)
    return _record(model, "retinanet", kwargs)


def mask_rcnn(
    backbone: str = "biformer_small",
    num_classes: int = 80,
    *,
    pretrained_backbone: Optional[PathLike] = None,
    n_win: int = 16,
    drop_path_rate: float = 0.2,
    norm_eval: bool = True,
    frozen_stages: int = -1,
    fpn_channels: int = 256,
    box_head_channels: int = 1024,
    mask_head_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    **detector_kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with BiFormer + FPN (P2-P6). ``detector_kwargs`` go to ``torchvision...MaskRCNN``.

    Paper (COCO 1x, 12 epochs, AdamW lr 1e-4, weight decay 0.05): BiFormer-S 47.8 box AP / 43.2 mask AP,
    BiFormer-B 48.6 / 43.7. ``box_head_channels`` is the width of the two-layer box MLP and
    ``mask_head_channels`` that of the four mask convs (torchvision's and the paper's defaults; smaller
    values make CPU runs and tests cheap).
    """
    kwargs = dict(locals())
    kwargs.update(kwargs.pop("detector_kwargs"))
    body = _backbone(backbone, pretrained_backbone, n_win, drop_path_rate, norm_eval, frozen_stages, backbone_kwargs)
    fpn = BiFormerFPN(body, in_levels=(0, 1, 2, 3), out_channels=fpn_channels, extra="pool")
    detector_kwargs.setdefault("rpn_post_nms_top_n_train", 1000)  # mmdetection keeps 1000 proposals in training too
    pool = 7  # RoIAlign output of the box branch (MaskRCNN's default box_roi_pool)
    model = MaskRCNN(
        fpn, None, min_size=min_size, max_size=max_size,
        box_head=TwoMLPHead(fpn_channels * pool * pool, box_head_channels),
        box_predictor=FastRCNNPredictor(box_head_channels, num_classes + 1),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
        **detector_kwargs,
    )
    return _record(model, "mask_rcnn", kwargs)


BUILDERS = {"retinanet": retinanet, "mask_rcnn": mask_rcnn}


def save_detector(path: PathLike, model: nn.Module, class_names: Sequence[str],
                  extra_metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a detector built here, with its class names, to a safetensors file (atomically)."""
    save_task_model(path, model, TASK, class_names, extra_metadata)


def load_detector(path: PathLike) -> "tuple[nn.Module, Dict[str, Any]]":
    """``(model, info)`` from :func:`save_detector`'s file; ``info["class_names"]`` names labels 1..K."""
    return load_task_model(path, TASK, BUILDERS)
