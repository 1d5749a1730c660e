"""Eager vs compiled for one BiFormer block (BRA + LCE + MLP) at one stage's shape.

python tools/compile_layer.py --stage 2 --threads 1 --repeats 9 [--backend auto] [--train] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from biformer.layers import BiLevelRoutingAttention
from biformer.models.biformer import BiFormerBlock

STAGES = {1: (56, 64, 2, 1), 2: (28, 128, 4, 4), 3: (14, 256, 8, 16)}  # BiFormer-S at 224: HW, dim, heads, topk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--attn-only", action="store_true")
    ap.add_argument("--amp", default="")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hw, dim, heads, topk = STAGES[args.stage]
    attn = BiLevelRoutingAttention(dim, num_heads=heads, n_win=7, topk=topk, layout="NHWC", backend=args.backend)
    module = attn if args.attn_only else BiFormerBlock(dim, attn)
    x = torch.randn(args.batch, hw, hw, dim, requires_grad=args.train)
    compiled = torch.compile(module, fullgraph=True)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def run(m):
        if args.train:
            with amp:
                out = m(x)
            out.float().square().mean().backward()
        else:
            with torch.no_grad(), amp:
                m(x)

    variants = {"eager": module, "compiled": compiled}
    for name, m in variants.items():
        t = time.perf_counter()
        run(m)
        run(m)
        print(f"{name} warm-up {time.perf_counter() - t:.1f}s", flush=True)
    times = {n: [] for n in variants}
    for _ in range(args.repeats):
        for n, m in variants.items():
            t = time.perf_counter()
            run(m)
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    for n, v in times.items():
        print(f"{n}: {med[n] * 1e3:.1f} ms (min {min(v) * 1e3:.1f}, max {max(v) * 1e3:.1f})")
    print(f"stage {args.stage} {'train' if args.train else 'infer'} eager/compiled: {med['eager'] / med['compiled']:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for n, m in variants.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    run(m)
            print(f"--- {n}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
