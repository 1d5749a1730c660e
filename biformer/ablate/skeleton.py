"""The ablation skeleton: BiFormer's STL layout (the paper's Swin-T layout) with a swappable token mixer.

Registered with timm as ``biformer_ablate`` so that ``biformer train`` (and its checkpoints) can
build it from plain config values: ``model: biformer_ablate``, ``model_kwargs: {mixer: window,
...}``. Everything but the mixer is :func:`biformer.models.biformer.biformer_stl`'s block, stage
and model code; the mixer enters through ``BiFormer(attn_factory=...)``.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..models.biformer import MODEL_ARGS, BiFormer, _cfg, checkpoint_filter_fn
from ..checkpoint import register_model_rules
from .mixers import MIXERS, mixer_factory

__all__ = ["DIGITS_SKELETON", "biformer_ablate"]

MODEL_NAME = "biformer_ablate"

# The skeleton `biformer ablate` trains on the digits (64 px): STL layout at 1/3 the width and two
# blocks per stage (the Swin pair), 16 regions per routed stage (maps 16, 8, 4; the 2x2 last stage
# keeps BiFormer's global attention in every variant).
DIGITS_SKELETON: Dict[str, Any] = dict(depths=[2, 2, 2, 2], embed_dims=[32, 64, 128, 256], n_win=4)

default_cfgs = generate_default_cfgs({f"{MODEL_NAME}.untrained": _cfg(first_conv="stem.conv")})


register_model_rules(MODEL_NAME, MODEL_ARGS["biformer_stl"], {
    "mixer": (lambda v: isinstance(v, str) and v in MIXERS, f"one of {', '.join(MIXERS)}"),
})


@register_model
def biformer_ablate(pretrained: bool = False, mixer: str = "bra", **kwargs: Any) -> BiFormer:
    """BiFormer-STL with ``mixer`` (a name of :data:`biformer.ablate.mixers.MIXERS`) as every routed
    stage's token mixer; ``mixer="bra"`` is ``biformer_stl`` itself (same parameters and outputs)."""
    return build_model_with_cfg(
        BiFormer,
        MODEL_NAME,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **{**MODEL_ARGS["biformer_stl"], **kwargs, "attn_factory": mixer_factory(mixer)},
    )
