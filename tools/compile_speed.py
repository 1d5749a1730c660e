"""Eager vs torch.compile (inductor, fullgraph) for one model: training step and inference.

python tools/compile_speed.py --model biformer_small --batch 8 --threads 2 --repeats 7 [--amp bf16] [--profile]
Interleaved eager/compiled runs, medians and (min, max) spread; ratios are eager/compiled time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import biformer  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="biformer_small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--amp", default="")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch,))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.amp == "bf16" else None
    variants = {"eager": model}
    if not args.no_compile:
        variants["compiled"] = torch.compile(model, fullgraph=True)

    def infer(m):
        model.eval()
        with torch.no_grad(), (amp or torch.autocast("cpu", enabled=False)):
            m(x)

    def train(m):
        model.train()
        with (amp or torch.autocast("cpu", enabled=False)):
            loss = torch.nn.functional.cross_entropy(m(x), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for mode in args.modes.split(","):
        fn = infer if mode == "infer" else train
        for name, m in variants.items():  # warm-up (compiles)
            t = time.perf_counter()
            fn(m)
            fn(m)
            print(f"{mode} {name} warm-up {time.perf_counter() - t:.1f}s", flush=True)
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, m in variants.items():
                t = time.perf_counter()
                fn(m)
                times[name].append(time.perf_counter() - t)
        med = {n: statistics.median(v) for n, v in times.items()}
        for n, v in times.items():
            print(f"{mode} {n}: median {med[n] * 1e3:.0f} ms (min {min(v) * 1e3:.0f}, max {max(v) * 1e3:.0f})", flush=True)
        if "compiled" in med:
            print(f"{mode} speed-up of compile: {med['eager'] / med['compiled']:.2f}x", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            for name, m in variants.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn(m)
                print(f"--- {mode} {name}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
