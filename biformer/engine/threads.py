"""CPU threads for a training run that shares its machine.

With one intra-op thread per core, every op waits at a barrier for its slowest thread; when another
process holds a core, that thread is descheduled and each op waits a whole time slice (the digits job
went from 1 to 6-12 minutes). So: leave the cores DataLoader workers use, and the cores other processes
are running on at start, to them; keep one inter-op thread; and (in the CLI, before torch loads) let
OpenMP threads sleep rather than spin while they wait.
"""
from __future__ import annotations

import os
import time
from typing import Optional

# Must be in the environment before torch (and its OpenMP runtime) loads to take effect.
PASSIVE_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def set_openmp_passive() -> None:
    """Waiting OpenMP threads sleep instead of spinning, so they do not steal a busy core.
    Values the user set are kept."""
    for key, value in PASSIVE_OPENMP.items():
        os.environ.setdefault(key, value)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def other_running(samples: int = 5, interval_s: float = 0.02) -> int:
    """Processes other than this one running now: /proc/loadavg's runnable count (it counts this
    process too), the median of a few samples, 0 where there is no /proc."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < samples:
            time.sleep(interval_s)
    counts.sort()
    return max(0, counts[len(counts) // 2] - 1)


def intra_op_threads(num_workers: int, local_world_size: int = 1, busy: Optional[int] = None) -> int:
    """Threads for one rank: its share of the usable cores, less its DataLoader workers and the cores
    other processes hold (sampled at start), at least 1."""
    busy = other_running() if busy is None else busy
    share = usable_cpus() // max(1, local_world_size)
    return max(1, min(share - num_workers, usable_cpus() - busy))


def configure_cpu_threads(num_workers: int, local_world_size: int = 1) -> Optional[int]:
    """Set torch's intra-op threads (see :func:`intra_op_threads`) and one inter-op thread; returns the
    count, or None when the user chose with ``OMP_NUM_THREADS``."""
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # inter-op work already started (e.g. in a test process): keep what it has
        pass
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = intra_op_threads(num_workers, local_world_size)
    torch.set_num_threads(threads)
    return threads
