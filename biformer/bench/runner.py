"""One benchmark run: conditions, the chosen parts, the targets; the results as one dict."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from ..errors import UserValueError
from .harness import memory_limit
from .report import compute_targets
from .suites import (WITH_ORIGINAL, BenchConfig, RowSink, infer_mode, measure_matmul_rate, run_layers, run_models,
                     train_mode)

__all__ = ["PARTS", "run_benchmark", "MEMORY_METHOD"]

PARTS = ("layers", "models", "efficiency")

MEMORY_METHOD = {
    "cpu": ("peak tensor bytes from torch.profiler allocator events (profile_memory=True) during the first call, "
            "plus the bytes of weights, buffers and inputs held before it"),
    "cuda": "torch.cuda.max_memory_allocated() growth during the first call, plus the weights and inputs held before it",
}


def _loadavg() -> Optional[str]:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _versions() -> Dict[str, Optional[str]]:
    from .. import __version__

    try:
        import timm

        timm_version: Optional[str] = timm.__version__
    except ImportError:
        timm_version = None
    return {"biformer": __version__, "torch": torch.__version__, "timm": timm_version,
            "python": platform.python_version()}


class RunMetadata:
    """Versions, machine, load and timing of one run, for its JSON and its header line."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self._start = time.perf_counter()
        self.data: Dict[str, Any] = {
            **_versions(),
            "device_name": _device_name(config.torch_device),
            "memory_method": MEMORY_METHOD.get(config.torch_device.type, "not measured"),
            "loadavg_before": _loadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv,
        }

    def finish(self) -> None:
        self.data["loadavg_after"] = _loadavg()
        self.data["duration_s"] = time.perf_counter() - self._start

    def summary(self) -> str:
        d = self.data
        return (f"torch {d['torch']}, timm {d['timm']}, {d['device_name']}, {self.config.threads} threads, "
                f"load {d['loadavg_before']} / {d.get('loadavg_after')}, wall {d.get('duration_s', 0):.0f} s")


def run_metadata(config: BenchConfig) -> RunMetadata:
    return RunMetadata(config)


def run_benchmark(
    config: BenchConfig,
    parts: Iterable[str] = PARTS,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
    sink: Optional[RowSink] = None,
) -> Dict[str, Any]:
    """Measure the chosen ``parts`` (see :data:`PARTS`) in this process; returns the results dict.

    Each finished measurement is also passed to ``sink`` as a timm-style row (see :mod:`.rows`).

    The thread count is set for the run and restored afterwards. On CPU the address space is
    capped at ``config.memory_budget_bytes`` above its current size while measuring.
    """
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown or not parts:
        raise UserValueError(f"got parts {sorted(unknown) or '[]'}, expected a non-empty subset of {PARTS}")
    device = config.torch_device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserValueError("got device cuda, but CUDA is not available here")
    config.torch_dtype  # validates the dtype name early
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    meta = RunMetadata(config)
    results: Dict[str, Any] = {
        "meta": meta.data,
        "config": config.to_dict(),
        "parts": sorted(parts),
    }
    try:
        with memory_limit(config.memory_budget_bytes if device.type == "cpu" else None):
            matmul_rate = measure_matmul_rate(config)
            results["meta"]["calibration_matmul_macs_per_s"] = matmul_rate
            log(f"[bench] {config.matmul_size}^3 matmul: {matmul_rate / 1e9:.1f} GMAC/s")
            if "layers" in parts:
                results["layers"] = run_layers(config, matmul_rate, log, sink)
            if "models" in parts or "efficiency" in parts:
                if "models" in parts:
                    names = config.models
                    modes = [infer_mode(b) for b in config.infer_batches]
                    modes += [train_mode(config.train_batch)] if config.train else []
                else:  # efficiency alone: the BiFormer models at the largest inference batch
                    names = tuple(m for m in config.models if m in WITH_ORIGINAL)
                    modes = [infer_mode(max(config.infer_batches))]
                results["models"] = run_models(config, log, model_names=names, modes=modes,
                                               with_matmul="efficiency" in parts, with_macs="efficiency" in parts,
                                               sink=sink)
    finally:
        torch.set_num_threads(threads_before)
    meta.finish()
    results["targets"] = [t.to_dict() for t in compute_targets(results)]
    return results
