"""Benchmark rows in timm ``benchmark.py``'s conventions, written one by one as they are measured.

timm's ``benchmark.py`` reports per model ``samples_per_sec``, ``step_time`` (ms per step),
``batch_size``, ``img_size``, ``param_count`` (millions) and ``gmacs`` (multiply-adds per image,
billions), prefixed ``infer_``/``train_`` when both are run. Here a row is one measurement, so
the mode is a column instead of a prefix, followed by the settings (compile, amp, runtime,
threads, device) and the spread of the timed repeats (min, max, interquartile range of the
step time, and the number of repeats).

:class:`RowWriter` appends each row to ``bench.csv`` and ``bench.jsonl`` and flushes them to disk
at once, so a run that is interrupted keeps every measurement it finished.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import IO, Any, Dict, List, Optional, Sequence

from ..errors import UserError

__all__ = ["COLUMNS", "RowWriter", "measurement_row", "read_rows"]

COLUMNS = (
    "model", "mode", "img_size", "batch_size", "samples_per_sec", "step_time", "param_count", "gmacs",
    "compile", "amp", "runtime", "threads", "device", "dtype",
    "step_time_min", "step_time_max", "step_time_iqr", "repeats", "peak_mb", "status", "group", "note",
)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _round(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


def measurement_row(
    *,
    model: str,
    mode: str,
    img_size: int,
    batch_size: int,
    outcome: Dict[str, Any],
    settings: Dict[str, Any],
    params: Optional[int] = None,
    macs_per_image: Optional[float] = None,
    group: str = "",
    note: str = "",
) -> Dict[str, Any]:
    """One row from an outcome dict (``Outcome.to_dict()``): times in ms, params in M, GMACs per image."""
    samples = sorted(outcome.get("samples_s") or [])
    median = outcome.get("median_s")
    peak = outcome.get("peak_bytes")
    row: Dict[str, Any] = {
        "model": model,
        "mode": mode,
        "img_size": img_size,
        "batch_size": batch_size,
        "samples_per_sec": _round(batch_size / median, 2) if median else None,
        "step_time": _round(1000 * median, 3) if median else None,
        "param_count": _round(params / 1e6, 2) if params else None,
        "gmacs": _round(macs_per_image / 1e9, 2) if macs_per_image else None,
        "compile": bool(settings.get("compile", False)),
        "amp": settings.get("amp") or "none",
        "runtime": settings.get("runtime", "eager"),
        "threads": settings.get("threads"),
        "device": settings.get("device", "cpu"),
        "dtype": settings.get("dtype", "float32"),
        "step_time_min": _round(1000 * samples[0], 3) if samples else None,
        "step_time_max": _round(1000 * samples[-1], 3) if samples else None,
        "step_time_iqr": (_round(1000 * (_quantile(samples, 0.75) - _quantile(samples, 0.25)), 3)
                          if samples else None),
        "repeats": len(samples),
        "peak_mb": _round(peak / 2 ** 20, 1) if peak else None,
        "status": outcome.get("status", "ok") if outcome.get("status") == "ok" else
        f"{outcome.get('status')}: {outcome.get('reason', '')}".strip(),
        "group": group,
        "note": note,
    }
    return row


class RowWriter:
    """Appends rows to ``<directory>/bench.csv`` and ``bench.jsonl``, each flushed and synced at once.

    An existing ``bench.csv`` is appended to when its header is ours (runs accumulate, as with timm's
    results file); a CSV with another header is refused rather than mixed with ours. The JSONL rows
    carry everything the CSV row has plus the raw samples.
    """

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.csv_path = os.path.join(directory, "bench.csv")
        self.jsonl_path = os.path.join(directory, "bench.jsonl")
        self.rows: List[Dict[str, Any]] = []
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        if not new:
            with open(self.csv_path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != COLUMNS:
                raise UserError(f"got --output {directory!r} whose bench.csv has other columns "
                                f"({', '.join(header[:4])}, ...); choose another --output folder")
        self._csv: IO[str] = open(self.csv_path, "a", newline="")
        self._jsonl: IO[str] = open(self.jsonl_path, "a")
        self._writer = csv.DictWriter(self._csv, fieldnames=COLUMNS)
        if new:
            self._writer.writeheader()
            self._sync(self._csv)

    @staticmethod
    def _sync(f: IO[str]) -> None:
        f.flush()
        os.fsync(f.fileno())

    def write(self, row: Dict[str, Any], samples_s: Optional[Sequence[float]] = None) -> None:
        """Append ``row`` to both files (the JSONL line also holds the raw samples, in seconds)."""
        self._writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
        self._sync(self._csv)
        self._jsonl.write(json.dumps({**row, "samples_s": list(samples_s or [])}) + "\n")
        self._sync(self._jsonl)
        self.rows.append(row)

    def close(self) -> None:
        self._csv.close()
        self._jsonl.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_rows(path: str) -> List[Dict[str, str]]:
    """The rows of a ``bench.csv`` as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
