"""BiFormer and Bi-Level Routing Attention for PyTorch.

Importing ``biformer`` registers ``biformer_tiny``, ``biformer_small``, ``biformer_base`` and
``biformer_stl`` with timm.
"""
import os as _os
import sys as _sys
from typing import Any as _Any

__version__ = "0.1.0"

_LAZY = {
    "BiLevelRoutingAttention": "layers", "BiLevelRoutingAttention3d": "layers", "GlobalAttentionLCE": "layers",
    "BiFormer": "models", "CheckpointMismatchError": "models", "checkpoint_filter_fn": "models",
    "RegionGrid": "ops", "Routing": "ops", "bi_level_routing_attention": "ops", "bi_level_routing_attention_3d": "ops",
}


def _started_as_cli() -> bool:
    """True while the ``biformer`` command or ``python -m biformer`` is starting: it imports torch only
    once a command runs, so ``--help`` answers at once; it registers the models then
    (:func:`biformer.cli.main`). Any other import of ``biformer`` registers them at once."""
    if _os.path.splitext(_os.path.basename(_sys.argv[0] if _sys.argv else ""))[0] in ("biformer", "biformer-script"):
        return True
    argv = list(getattr(_sys, "orig_argv", []))
    return any(a == "-m" and b == "biformer" for a, b in zip(argv, argv[1:])) and _sys.argv[:1] == ["-m"]


# read once, now: once the command runs, sys.argv no longer tells (subpackages such as ablate ask this)
_CLI_START = _started_as_cli()

if _CLI_START:
    def __getattr__(name: str) -> _Any:
        if name in _LAZY:
            import importlib

            value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    from .layers import BiLevelRoutingAttention, BiLevelRoutingAttention3d, GlobalAttentionLCE
    from .models import BiFormer, CheckpointMismatchError, checkpoint_filter_fn
    from .ops import RegionGrid, Routing, bi_level_routing_attention, bi_level_routing_attention_3d


def save_pretrained(model, directory, **kwargs):  # type: ignore[no-untyped-def]
    """Write ``model`` as a Hugging Face Hub folder in timm's layout; see :func:`biformer.hub.save_pretrained`."""
    from .hub import save_pretrained as save

    return save(model, directory, **kwargs)


__all__ = [
    "BiFormer",
    "BiLevelRoutingAttention",
    "BiLevelRoutingAttention3d",
    "CheckpointMismatchError",
    "GlobalAttentionLCE",
    "RegionGrid",
    "Routing",
    "bi_level_routing_attention",
    "bi_level_routing_attention_3d",
    "checkpoint_filter_fn",
    "save_pretrained",
]
