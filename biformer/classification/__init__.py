"""Image classification: training, evaluation, prediction and the digits demo data, the commands
``biformer classify train|eval|predict|demo-data`` (``biformer train|eval|predict`` for short).

The recipe defaults are the paper's ImageNet recipe; ``--preset digits`` (the default when no data
is given) trains a small BiFormer on scikit-learn's bundled handwritten digits in minutes on a CPU.
Submodules are imported on first use, so ``biformer classify --help`` does not load torch.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "PRESETS": "config",
    "TrainConfig": "config",
    "build_config": "config",
    "ClassificationTask": "training",
    "EvalResult": "engine",
    "evaluate": "engine",
    "train": "training",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
