"""Model analysis: parameter and FLOP counts (:mod:`.flops`) and the complexity of one BRA layer
against its region count (:mod:`.complexity`)."""
from .._lazy import lazy_exports

_FLOPS = ("FlopReport", "PartCount", "count_flops", "reference_routing", "sdpa_flop_jit")
# loaded on first use: .flops imports torch, and ``biformer flops --help`` must not
__getattr__ = lazy_exports(__name__, {name: "flops" for name in _FLOPS})

__all__ = list(_FLOPS)
