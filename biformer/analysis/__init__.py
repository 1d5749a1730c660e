"""Model analysis: parameter and FLOP counts (:mod:`.flops`) and the complexity of one BRA layer
against its region count (:mod:`.complexity`)."""
import importlib
from typing import Any

_FLOPS = ("FlopReport", "PartCount", "count_flops", "reference_routing", "sdpa_flop_jit")


def __getattr__(name: str) -> Any:
    """Loaded on first use: .flops imports torch, and ``biformer flops --help`` must not."""
    if name not in _FLOPS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.flops"), name)
    globals()[name] = value
    return value

__all__ = ["FlopReport", "PartCount", "count_flops", "reference_routing", "sdpa_flop_jit"]
