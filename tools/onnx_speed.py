"""Export models with torch.onnx.export(dynamo=True) and time them in ONNX Runtime (CPU EP).

python tools/onnx_speed.py --models biformer_tiny,swin_tiny_patch4_window7_224 --batch 8 --threads 2 [--profile]
Runs are interleaved across models; medians and (min, max); img/s and ratios to the first model.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort
import timm
import torch

import biformer  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="biformer_tiny,swin_tiny_patch4_window7_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--outdir", default=tempfile.mkdtemp())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)
    sessions = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        path = os.path.join(args.outdir, f"{name}.onnx")
        t = time.perf_counter()
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["images"], output_names=["logits"])
        print(f"{name}: exported in {time.perf_counter() - t:.0f}s", flush=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        if args.profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(args.outdir, name)
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"{name}: max |ORT - PyTorch| / max |PyTorch| = {err:.2e}", flush=True)
        sessions[name] = sess
    times = {n: [] for n in sessions}
    feed = {"images": x.numpy()}
    for _ in range(args.repeats):
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[n].append(time.perf_counter() - t)
    first = next(iter(times))
    for n, v in times.items():
        med = statistics.median(v)
        print(f"{n}: {args.batch / med:.1f} img/s (median {med * 1e3:.0f} ms, min {min(v) * 1e3:.0f}, max {max(v) * 1e3:.0f});"
              f" speed vs {first}: {statistics.median(times[first]) / med:.2f}x")
    if args.profile:
        for n, s in sessions.items():
            prof = s.end_profiling()
            per_op = collections.Counter()
            for ev in json.load(open(prof)):
                if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                    per_op[ev["args"]["op_name"]] += ev["dur"]
            total = sum(per_op.values())
            print(f"--- {n}: time per ONNX op type")
            for op, dur in per_op.most_common(15):
                print(f"  {op:28s} {100 * dur / total:5.1f}%")


if __name__ == "__main__":
    main()
