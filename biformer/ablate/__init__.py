"""``biformer ablate``: the paper's attention ablation, BRA against other token mixers in one skeleton.

Importing this package registers the ``biformer_ablate`` timm model. See docs/ablation.md.
"""
from __future__ import annotations

from .. import _CLI_START
from .._lazy import lazy_exports

_WHERE = {"MIXERS": "mixers", "ROUTED_MIXERS": "mixers", "build_mixer": "mixers", "mixer_factory": "mixers",
          "DIGITS_SKELETON": "skeleton", "biformer_ablate": "skeleton"}

if _CLI_START:  # as biformer/__init__.py: `biformer ablate --help` must not load torch; the command
    # imports the skeleton (and so registers it) when it runs
    __getattr__ = lazy_exports(__name__, _WHERE)
else:
    from .mixers import MIXERS, ROUTED_MIXERS, build_mixer, mixer_factory
    from .skeleton import DIGITS_SKELETON, biformer_ablate

__all__ = ["DIGITS_SKELETON", "MIXERS", "ROUTED_MIXERS", "biformer_ablate", "build_mixer", "mixer_factory"]
