"""``biformer bench``: BRA backends and whole models against the original algorithm and baselines.

* :mod:`.baseline`: the original BRA algorithm on our layer's weights (:func:`original_bra`), the
  whole original model (:func:`use_original_bra`), full attention, and an analytic memory estimate;
* :mod:`.harness`: interleaved timing with medians, peak-memory measurement;
* :mod:`.suites`: the parts (BRA layers, whole models, efficiency);
* :mod:`.runner` / :mod:`.report`: one run as a dict; tables, targets, JSON and PNG.
"""
from .baseline import full_attention, original_bra, original_bra_peak_bytes, use_original_bra
from .harness import Bench, Outcome, peak_memory_growth, run_group
from .runner import PARTS, run_benchmark
from .suites import BenchConfig, LayerCase

__all__ = [
    "PARTS",
    "Bench",
    "BenchConfig",
    "LayerCase",
    "Outcome",
    "full_attention",
    "original_bra",
    "original_bra_peak_bytes",
    "peak_memory_growth",
    "run_benchmark",
    "run_group",
    "use_original_bra",
]
