"""Semantic segmentation with a BiFormer backbone: UperNet and Semantic FPN.

Both are :class:`Segmentor` modules: ``(B, 3, H, W)`` float RGB in [0, 1] (normalised inside with the
ImageNet mean/std) -> logits ``(B, num_classes, H, W)`` for any ``H x W``. ``Segmentor.losses(images,
labels)`` gives the training losses (cross-entropy, label 255 ignored; UperNet adds its auxiliary
FCN head at weight 0.4).

The heads are small and written here rather than taken from a library: they follow
mmsegmentation's ``UPerHead``, ``FCNHead``, ``FPN`` neck and ``FPNHead`` layer for layer (the
configurations the paper trained), which segmentation_models_pytorch's decoders do not (its FPN
expects five encoder levels and its UPerNet differs in widths), and they add no dependency.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork

from ..backbone import BiFormerBackbone, PathLike
from ..checkpoint import load_task_model, save_task_model

__all__ = [
    "Segmentor",
    "UPerHead",
    "FPNHead",
    "FCNHead",
    "upernet",
    "semantic_fpn",
    "BUILDERS",
    "save_segmentor",
    "load_segmentor",
    "IGNORE_INDEX",
]

TASK = "segmentation"
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """conv (no bias) + BatchNorm + ReLU, mmcv's ``ConvModule`` with a norm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


class _Classifier(nn.Module):
    """Dropout then a 1x1 conv to class logits: the end of every head."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(nn.Module):
    """Unified Perceptual Parsing head: pyramid pooling on the coarsest map, an FPN over all, fused at stride 4."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        top = in_channels[-1]
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = nn.ModuleList([ConvBNReLU(top, channels) for _ in self.pool_scales])
        self.bottleneck = ConvBNReLU(top + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def _psp(self, x: Tensor) -> Tensor:
        pooled = [_resize(conv(F.adaptive_avg_pool2d(x, s)), x.shape[-2:]) for s, conv in zip(self.pool_scales, self.psp_modules)]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))  # (B, C_top + n*ch, h, w) -> (B, ch, h, w)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self._psp(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(fused)  # (B, num_classes, H/4, W/4)


class FCNHead(nn.Module):
    """``num_convs`` 3x3 conv-BN-ReLU then a classifier (UperNet's auxiliary head on stride 16)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        layers = [ConvBNReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.convs(x))


class FPNHead(nn.Module):
    """Semantic FPN head (Kirillov et al. 2019): each FPN level is brought to stride 4 by 3x3 conv +
    2x upsampling steps, the levels are summed, and a classifier follows."""

    def __init__(self, in_channels: int, num_classes: int, strides: Sequence[int] = (4, 8, 16, 32),
                 channels: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: List[nn.Module] = []
            for k in range(steps):
                layers.append(ConvBNReLU(in_channels if k == 0 else channels, channels, 3))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            # odd sizes: a 2x-upsampled coarse map can be one pixel off, so resize to the finest level
            out = out + _resize(head(f), out.shape[-2:])
        return self.classifier(out)  # (B, num_classes, H/4, W/4)


class Segmentor(nn.Module):
    """Backbone -> optional neck -> decode head (+ optional auxiliary head), logits at input size."""

    def __init__(
        self,
        backbone: BiFormerBackbone,
        decode_head: nn.Module,
        neck: Optional[nn.Module] = None,
        auxiliary_head: Optional[nn.Module] = None,
        auxiliary_index: int = 2,
        auxiliary_weight: float = 0.4,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.auxiliary_index = auxiliary_index
        self.auxiliary_weight = auxiliary_weight
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _features(self, images: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        feats = self.backbone((images - self.mean) / self.std)
        if self.neck is None:
            return feats, feats
        pyramid = self.neck(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(pyramid.values()), feats

    def forward_with_aux(self, images: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Main and auxiliary logits, both ``(B, K, H, W)`` (auxiliary is None without that head)."""
        head_in, feats = self._features(images)
        size = images.shape[-2:]
        logits = _resize(self.decode_head(head_in), size)
        aux = None
        if self.auxiliary_head is not None:
            aux = _resize(self.auxiliary_head(feats[self.auxiliary_index]), size)
        return logits, aux

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> Any:
        """Logits ``(B, K, H, W)``; with ``labels``, the training losses (as torchvision's detectors do,
        so that DDP sees the training forward)."""
        if labels is not None:
            return self.losses(images, labels)
        head_in, _ = self._features(images)
        return _resize(self.decode_head(head_in), images.shape[-2:])  # (B, K, H/4, W/4) -> (B, K, H, W)

    def losses(self, images: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        """Cross-entropy over labelled pixels (``labels`` (B, H, W) int64; 255 = ignore)."""
        logits, aux = self.forward_with_aux(images)
        out = {"loss_seg": F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)}
        if aux is not None:
            out["loss_aux"] = self.auxiliary_weight * F.cross_entropy(aux, labels, ignore_index=IGNORE_INDEX)
        return out


def _record(model: nn.Module, builder: str, kwargs: Dict[str, Any]) -> nn.Module:
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained_backbone"}
    model.build_config = {"builder": builder, "kwargs": kwargs}
    return model


def upernet(
    backbone: str = "biformer_small",
    num_classes: int = 150,
    *,
    pretrained_backbone: Optional[PathLike] = None,
    n_win: int = 8,
    drop_path_rate: float = 0.3,
    channels: int = 512,
    auxiliary: bool = True,
    auxiliary_channels: int = 256,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
) -> Segmentor:
    """UperNet over BiFormer (paper, ADE20K 512^2, 160k steps: BiFormer-S 49.8 mIoU, BiFormer-B 51.0).

    ``channels`` is the head width (512 in the paper); ``auxiliary`` adds the FCN head on stage 2.
    """
    kwargs = dict(locals())
    body = BiFormerBackbone(backbone, n_win=n_win, pretrained=pretrained_backbone, drop_path_rate=drop_path_rate,
                            **(backbone_kwargs or {}))
    head = UPerHead(body.out_channels, num_classes, channels=channels)
    aux = FCNHead(body.out_channels[2], num_classes, channels=auxiliary_channels) if auxiliary else None
    return _record(Segmentor(body, head, auxiliary_head=aux, auxiliary_index=2), "upernet", kwargs)


def semantic_fpn(
    backbone: str = "biformer_small",
    num_classes: int = 150,
    *,
    pretrained_backbone: Optional[PathLike] = None,
    n_win: int = 8,
    drop_path_rate: float = 0.15,
    fpn_channels: int = 256,
    channels: int = 128,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
) -> Segmentor:
    """Semantic FPN over BiFormer (paper, ADE20K 512^2, 80k steps: BiFormer-S 48.9 mIoU, BiFormer-B 49.9).

    ``fpn_channels`` is the FPN width (256) and ``channels`` the head width (128), as in the paper.
    """
    kwargs = dict(locals())
    body = BiFormerBackbone(backbone, n_win=n_win, pretrained=pretrained_backbone, drop_path_rate=drop_path_rate,
                            **(backbone_kwargs or {}))
    neck = FeaturePyramidNetwork(body.out_channels, fpn_channels)  # lateral 1x1 + output 3x3, no norm
    head = FPNHead(fpn_channels, num_classes, strides=body.strides, channels=channels)
    return _record(Segmentor(body, head, neck=neck), "semantic_fpn", kwargs)


BUILDERS = {"upernet": upernet, "semantic_fpn": semantic_fpn}


def save_segmentor(path: PathLike, model: nn.Module, class_names: Sequence[str],
                   extra_metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a segmentor built here, with its class names, to a safetensors file (atomically)."""
    save_task_model(path, model, TASK, class_names, extra_metadata)


def load_segmentor(path: PathLike) -> "tuple[nn.Module, Dict[str, Any]]":
    """``(model, info)`` from :func:`save_segmentor`'s file; ``info["class_names"]`` names classes 0..K-1."""
    return load_task_model(path, TASK, BUILDERS)
