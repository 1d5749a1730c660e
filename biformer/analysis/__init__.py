"""Model analysis: parameter and FLOP counts (:mod:`.flops`) and the complexity of one BRA layer
against its region count (:mod:`.complexity`)."""
from .flops import FlopReport, PartCount, count_flops, reference_routing, sdpa_flop_jit

__all__ = ["FlopReport", "PartCount", "count_flops", "reference_routing", "sdpa_flop_jit"]
