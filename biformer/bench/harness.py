"""Timing and memory measurement for ``biformer bench``.

Timing: candidates of a group are run round-robin (the starting candidate rotates each round), so
a slow spell of a shared machine hits all of them alike; each sample is the mean of enough calls
to last ``min_sample_s``; the reported figure is the median sample.

Peak memory is the peak of *tensor* memory while a call runs, plus the bytes the call's state holds
before it starts (weights, buffers, inputs, optimizer state), i.e. what
``torch.cuda.max_memory_allocated`` reports for a process that holds just this candidate:

* CUDA: ``max_memory_allocated() - memory_allocated()`` around the call;
* CPU: the allocator events of ``torch.profiler`` (``profile_memory=True``). Each allocation event
  carries the running total of bytes allocated since profiling started and not yet freed; its
  maximum is the call's peak growth. It is exact for tensors, unlike resident-set sizes, which the
  C allocator's caching of freed pages blurs in both directions. Memory that libraries allocate
  outside PyTorch's allocator (oneDNN or BLAS scratch) is not counted, as on CUDA.

The first call of each candidate is the memory measurement; it doubles as the first warm-up call.
"""
from __future__ import annotations

import math
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import BackendUnavailable

__all__ = [
    "Bench",
    "Outcome",
    "run_group",
    "peak_memory_growth",
    "tensor_bytes",
    "memory_limit",
    "available_memory_bytes",
]

OK, UNAVAILABLE, SKIPPED, OUT_OF_MEMORY, FAILED = "ok", "unavailable", "skipped", "out_of_memory", "failed"


@dataclass
class Bench:
    """One thing to measure: a zero-argument call and the bytes its state holds before it runs.

    ``skip_reason`` marks a candidate that is known not to fit (it is reported, never called).
    ``prepare`` does one-off work (compiling, exporting) before the first call; what it returns is
    kept in :attr:`Outcome.info`. ``measure_memory=False`` leaves the peak unmeasured (for calls whose
    memory PyTorch's allocator does not see, such as ONNX Runtime).
    """

    name: str
    call: Callable[[], Any]
    resident_bytes: int = 0
    skip_reason: Optional[str] = None
    prepare: Optional[Callable[[], Dict[str, Any]]] = None
    measure_memory: bool = True


@dataclass
class Outcome:
    """What one candidate measured: its status, timing samples (seconds per call) and peak bytes."""

    status: str = OK
    reason: str = ""
    samples_s: List[float] = field(default_factory=list)
    calls_per_sample: int = 1
    peak_bytes: Optional[int] = None
    setup_s: Optional[float] = None  # time of Bench.prepare (compilation, export)
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def median_s(self) -> Optional[float]:
        if not self.samples_s:
            return None
        s = sorted(self.samples_s)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "median_s": self.median_s,
            "min_s": min(self.samples_s) if self.samples_s else None,
            "max_s": max(self.samples_s) if self.samples_s else None,
            "samples_s": self.samples_s,
            "calls_per_sample": self.calls_per_sample,
            "peak_bytes": self.peak_bytes,
            "setup_s": self.setup_s,
            "info": self.info,
        }


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def classify_failure(e: BaseException) -> Outcome:
    """A backend that refuses the input is 'unavailable'; running out of memory is its own status."""
    if isinstance(e, (BackendUnavailable, ValueError, NotImplementedError)):
        return Outcome(UNAVAILABLE, str(e).strip()[:300])
    text = str(e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text or "out of memory" in text:
        return Outcome(OUT_OF_MEMORY, _first_line(e))
    return Outcome(FAILED, _first_line(e))


# --------------------------------------------------------------------------------------------
# memory


def tensor_bytes(*items: Any) -> int:
    """Bytes held by the tensors in ``items`` (modules, optimizers, tensors, nested lists/dicts), each storage once."""
    seen: Dict[int, int] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            if obj.grad is not None:
                visit(obj.grad)
        elif isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t)
        elif isinstance(obj, torch.optim.Optimizer):
            visit(list(obj.state.values()))
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for item in items:
        visit(item)
    return sum(seen.values())


def _walk(nodes: Iterable[Any]) -> Iterator[Any]:
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def _cpu_peak_growth(call: Callable[[], Any]) -> int:
    # kineto writes a line to stderr at every profiler start/stop unless told not to
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    peak = 0
    for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        total = getattr(node.extra_fields, "total_allocated", None)  # allocation events only
        if total is not None and node.extra_fields.device.type == "cpu":
            peak = max(peak, int(total))
    return peak


def peak_memory_growth(call: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensor memory that ``call()`` allocates on ``device`` above what existed before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        return _cpu_peak_growth(call)
    raise ValueError(f"got device {device}, expected cpu or cuda for memory measurement")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device`` now: MemAvailable on Linux CPUs, free memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _virtual_size() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def memory_limit(extra_bytes: Optional[int]) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra_bytes`` (Linux, CPU runs).

    A candidate that would need more then fails with "can't allocate memory" instead of driving a
    shared machine into swap or the OOM killer. No-op where the size cannot be read.
    """
    size = _virtual_size()
    if extra_bytes is None or size is None:
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra_bytes
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


# --------------------------------------------------------------------------------------------
# timing


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(call: Callable[[], Any], n: int, sync: Callable[[], None]) -> float:
    """Seconds per call over ``n`` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(n):
        call()
    sync()
    return (time.perf_counter() - start) / n


def run_group(
    benches: Sequence[Bench],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    min_sample_s: float = 0.05,
    measure_memory: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> Dict[str, Outcome]:
    """Measure ``benches`` interleaved; one :class:`Outcome` per name, in the given order.

    ``warmup`` counts untimed calls per candidate, the memory measurement included (so at least
    one call is always made before timing). A candidate that raises is recorded (unavailable, out
    of memory, failed) and dropped from the rounds; the others go on.
    """
    if repeats < 1:
        raise ValueError(f"got repeats={repeats}, expected at least 1")
    sync = _synchronizer(device)
    outcomes: Dict[str, Outcome] = {}
    active: List[Bench] = []
    last_call_s: Dict[str, float] = {}
    for bench in benches:
        if bench.skip_reason:
            outcomes[bench.name] = Outcome(SKIPPED, bench.skip_reason)
            continue
        outcome = Outcome()
        try:
            if bench.prepare is not None:
                start = time.perf_counter()
                outcome.info = dict(bench.prepare())
                outcome.setup_s = time.perf_counter() - start
                log(f"  {bench.name}: prepared in {outcome.setup_s:.1f} s")
            start = time.perf_counter()
            if measure_memory and bench.measure_memory:
                outcome.peak_bytes = bench.resident_bytes + peak_memory_growth(bench.call, device)
            else:
                _timed(bench.call, 1, sync)
            last_call_s[bench.name] = time.perf_counter() - start
            for _ in range(warmup - 1):
                last_call_s[bench.name] = _timed(bench.call, 1, sync)
        except Exception as e:  # noqa: BLE001 - one broken candidate must not end the benchmark
            outcome = classify_failure(e)
            log(f"  {bench.name}: {outcome.status} ({outcome.reason})")
        outcomes[bench.name] = outcome
        if outcome.ok:
            outcome.calls_per_sample = max(1, math.ceil(min_sample_s / max(last_call_s[bench.name], 1e-9)))
            active.append(bench)

    for r in range(repeats):
        shift = r % len(active) if active else 0
        for bench in active[shift:] + active[:shift]:
            outcome = outcomes[bench.name]
            if not outcome.ok:
                continue
            try:
                outcome.samples_s.append(_timed(bench.call, outcome.calls_per_sample, sync))
            except Exception as e:  # noqa: BLE001
                failed = classify_failure(e)
                outcome.status, outcome.reason = failed.status, failed.reason
                log(f"  {bench.name}: {outcome.status} ({outcome.reason})")
        log(f"  round {r + 1}/{repeats} done")
    return outcomes
