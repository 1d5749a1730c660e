"""``biformer ablate``: the paper's attention ablation, BRA against other token mixers in one skeleton.

Importing this package registers the ``biformer_ablate`` timm model. See docs/ablation.md.
"""
from __future__ import annotations

from .mixers import MIXERS, ROUTED_MIXERS, build_mixer, mixer_factory
from .skeleton import DIGITS_SKELETON, biformer_ablate

__all__ = ["DIGITS_SKELETON", "MIXERS", "ROUTED_MIXERS", "biformer_ablate", "build_mixer", "mixer_factory"]
