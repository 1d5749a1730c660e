"""Registers :class:`MMBiFormerBackbone` as ``BiFormerBackbone`` with mmdetection and mmsegmentation.

Nothing here needs OpenMMLab: each registry is used only when its package imports. In an mm
config, import this module and name the backbone::

    custom_imports = dict(imports=["biformer.integrations.mm"], allow_failed_imports=False)
    model = dict(backbone=dict(_delete_=True, type="BiFormerBackbone", model_name="biformer_small",
                               n_win=16, drop_path_rate=0.2, norm_eval=True,
                               pretrained="biformer_small.safetensors"))

Both mmdet/mmseg 3.x/1.x (``mmdet.registry.MODELS``) and 2.x/0.x (``mmdet.models.builder.BACKBONES``)
registries are tried. See ``configs/mmdet`` and ``configs/mmseg`` for the paper's setups.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from ..backbone import BiFormerBackbone

__all__ = ["MMBiFormerBackbone", "register", "REGISTERED", "REGISTRY_NAME"]

REGISTRY_NAME = "BiFormerBackbone"

# (module, attribute) of each registry that takes backbones, newest API first
_REGISTRIES = (
    ("mmdet.registry", "MODELS"),
    ("mmseg.registry", "MODELS"),
    ("mmdet.models.builder", "BACKBONES"),
    ("mmseg.models.builder", "BACKBONES"),
)


class MMBiFormerBackbone(BiFormerBackbone):
    """:class:`biformer.backbone.BiFormerBackbone` with OpenMMLab's conventions: a tuple of maps out,
    ``init_cfg=dict(type="Pretrained", checkpoint=PATH)`` accepted for ``pretrained``, and an
    ``init_weights()`` that mm runners may call (weights are loaded at construction)."""

    def __init__(self, model_name: str = "biformer_small", *, init_cfg: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        if init_cfg is not None:
            if init_cfg.get("type") != "Pretrained" or "checkpoint" not in init_cfg:
                raise ValueError(f"got init_cfg={init_cfg!r}, expected dict(type='Pretrained', checkpoint=PATH)")
            if kwargs.get("pretrained") is not None:
                raise ValueError("give the checkpoint as pretrained= or as init_cfg, not both")
            kwargs["pretrained"] = init_cfg["checkpoint"]
        super().__init__(model_name, **kwargs)

    def init_weights(self) -> None:
        """Weights were set in ``__init__`` (random, or the ``pretrained`` checkpoint)."""

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(super().forward(x))


REGISTERED: List[str] = []


def register() -> List[str]:
    """Register with every importable OpenMMLab registry; returns their ``module.attribute`` names."""
    done = []
    for module_name, attr in _REGISTRIES:
        try:
            registry = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        registry.register_module(name=REGISTRY_NAME, module=MMBiFormerBackbone, force=True)
        done.append(f"{module_name}.{attr}")
    REGISTERED[:] = done
    return done


register()
