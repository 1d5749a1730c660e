"""``biformer bench``: BRA backends and whole models against the original algorithm and baselines.

* :mod:`.baseline`: the original BRA algorithm on our layer's weights (:func:`original_bra`), the
  whole original model (:func:`use_original_bra`), full attention, and an analytic memory estimate;
* :mod:`.harness`: interleaved timing with medians, peak-memory measurement;
* :mod:`.suites`: the parts (BRA layers, whole models, efficiency);
* :mod:`.runner` / :mod:`.report`: one run as a dict; tables, targets, JSON and PNG.
"""
from .._lazy import lazy_exports

# Loaded on first use: the submodules import torch, and ``biformer bench --help`` must not.
_WHERE = {
    "full_attention": "baseline", "original_bra": "baseline", "original_bra_peak_bytes": "baseline",
    "use_original_bra": "baseline", "Bench": "harness", "Outcome": "harness", "peak_memory_growth": "harness",
    "run_group": "harness", "PARTS": "runner", "run_benchmark": "runner", "BenchConfig": "suites",
    "LayerCase": "suites",
}


__getattr__ = lazy_exports(__name__, _WHERE)


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
