"""Training memory as the operating system sees it: RSS growth of a fresh process.

``python -m biformer.bench.rss --model NAME`` builds the model, an AdamW optimizer and one batch,
records the resident set size (RSS), then runs training steps. Before each step the kernel's
peak-RSS mark (``VmHWM``) is reset (``/proc/self/clear_refs``, Linux 4.0+), so the peak read after
the step is that step's own. It prints one JSON line:

* ``first_step_bytes``: peak RSS during the first step minus the RSS before it (the first step
  also allocates the optimizer state and the allocator's caches);
* ``steady_step_bytes``: the largest such peak over the later steps, against the same baseline.

Unlike the harness's tensor peaks this counts everything the process holds: oneDNN and BLAS
scratch, the C allocator's caches, fragmentation. :func:`measure_rss` runs it in a subprocess
(a fresh process each time, as the figure requires).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

__all__ = ["measure_rss", "main"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS


def _run(model_name: str, batch: int, image_size: int, threads: int, steps: int, amp: Optional[str]) -> Dict[str, Any]:
    import timm
    import torch
    import torch.nn.functional as F

    import biformer  # noqa: F401 - registers the BiFormer models with timm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=1000).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch,))
    dtype = {"bf16": torch.bfloat16, None: None}[amp]
    baseline = _status_bytes("VmRSS")
    peaks: List[int] = []
    for _ in range(steps):
        _reset_peak()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        peaks.append(_status_bytes("VmHWM") - baseline)
    return {
        "model": model_name,
        "batch": batch,
        "image_size": image_size,
        "threads": threads,
        "baseline_rss_bytes": baseline,
        "first_step_bytes": peaks[0],
        "steady_step_bytes": max(peaks[1:]) if len(peaks) > 1 else None,
        "step_bytes": peaks,
        "loss": float(loss),
    }


def measure_rss(model_name: str, *, batch: int, image_size: int, threads: int, steps: int = 3,
                amp: Optional[str] = None, timeout_s: float = 900.0) -> Dict[str, Any]:
    """Run :func:`main` for ``model_name`` in a fresh Python process and return its JSON result."""
    cmd = [sys.executable, "-m", "biformer.bench.rss", "--model", model_name, "--batch", str(batch),
           "--image-size", str(image_size), "--threads", str(threads), "--steps", str(steps)]
    if amp:
        cmd += ["--amp", amp]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"RSS measurement of {model_name} failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biformer.bench.rss", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="training steps; the first is reported apart")
    parser.add_argument("--amp", choices=["bf16"], help="bf16 autocast")
    args = parser.parse_args(argv)
    print(json.dumps(_run(args.model, args.batch, args.image_size, args.threads, args.steps, args.amp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
