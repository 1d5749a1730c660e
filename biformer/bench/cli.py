"""``biformer bench``: BRA backends and whole models against the original algorithm, Swin-T and ConvNeXt-T.

Prints tables and the speed and memory targets to stdout (progress goes to stderr), and writes
``bench.json`` and ``bench.png`` to ``--output``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List

import torch

from ..errors import UserValueError
from .harness import available_memory_bytes
from .report import format_report, output_paths, write_chart, write_json
from .runner import PARTS, run_benchmark
from .suites import MODELS, T_STAGE_CASES, BenchConfig

QUICK_REPEATS, QUICK_LAYER_BATCH, QUICK_TRAIN_BATCH = 3, 2, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Parts (default: all): --layers (BRA layer at the BiFormer-T stage shapes and two large maps), "
                     "--models (BiFormer-T/S, their originals, Swin-T, ConvNeXt-T), --efficiency (model MAC/s "
                     "against a plain matmul). Timings are medians of interleaved rounds in one process.")
    parts = parser.add_argument_group("parts")
    for part in PARTS:
        parts.add_argument(f"--{part}", action="store_true", help=f"run the {part} part")
    parser.add_argument("--quick", action="store_true",
                        help=f"small fast run: layers at batch {QUICK_LAYER_BATCH}, no large maps, "
                             f"training at batch {QUICK_TRAIN_BATCH}, {QUICK_REPEATS} rounds")
    parser.add_argument("--no-large-maps", action="store_true", help="skip the 448x448 and 600x500 layer cases")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="BRA backends to measure (default: every one biformer.ops.available_backends() lists)")
    parser.add_argument("--models-list", nargs="+", metavar="NAME", default=list(MODELS), dest="model_names",
                        help="timm model names for the model part (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: 7, --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls per candidate, the memory pass included (default: 2)")
    parser.add_argument("--large-repeats", type=int, default=2,
                        help="timed rounds for the large-map layer cases (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8,
                        help="inference batch (besides 1) and training batch (default: %(default)s)")
    parser.add_argument("--matmul-size", type=int, default=1024, help="n of the n x n x n reference matmul")
    parser.add_argument("--macs-source", default="auto", choices=["auto", "analysis", "flop_counter"],
                        help="model multiply-add count: biformer.analysis.flops (fvcore, paper-style) or "
                             "torch's FlopCounterMode; auto prefers analysis (default: %(default)s)")
    parser.add_argument("--memory-budget-gb", type=float,
                        help="candidates estimated to need more are not run, and on CPU allocations past it fail "
                             "cleanly (default: half the memory available at start)")
    parser.add_argument("--max-call-seconds", type=float, default=60.0,
                        help="quadratic full attention predicted to take longer per call is not run (default: %(default)s)")
    parser.add_argument("--output", default="bench-results", metavar="DIR",
                        help="where bench.json and bench.png go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    for name in ("threads", "repeats", "warmup", "large_repeats", "image_size", "batch", "matmul_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserValueError(f"got --{name.replace('_', '-')}={value}, expected a positive integer")
    for name in ("memory_budget_gb", "max_call_seconds"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UserValueError(f"got --{name.replace('_', '-')}={value}, expected a positive number")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UserValueError(f"got --device {args.device!r}, expected cpu, cuda or cuda:N") from e
    budget = (args.memory_budget_gb * 2 ** 30 if args.memory_budget_gb is not None
              else available_memory_bytes(device) // 2)
    notes: List[str] = []
    cases = T_STAGE_CASES
    if args.quick:
        cases = tuple(dataclasses.replace(c, batch=QUICK_LAYER_BATCH) for c in T_STAGE_CASES)
        notes.append(f"--quick: layers at batch {QUICK_LAYER_BATCH}, no large maps, training at batch "
                     f"{QUICK_TRAIN_BATCH}; use the full run for the targets")
    elif not args.no_large_maps:
        from .suites import LARGE_CASES

        cases = T_STAGE_CASES + LARGE_CASES
    config = BenchConfig(
        device=str(device),
        dtype=args.dtype,
        threads=args.threads,
        repeats=args.repeats or (QUICK_REPEATS if args.quick else 7),
        warmup=args.warmup or 2,
        large_repeats=args.large_repeats,
        layer_cases=cases,
        backends=tuple(args.backends) if args.backends else None,
        models=tuple(args.model_names),
        image_size=args.image_size,
        infer_batches=(1, args.batch),
        train_batch=QUICK_TRAIN_BATCH if args.quick else args.batch,
        matmul_size=args.matmul_size,
        mac_source=args.macs_source,
        memory_budget_bytes=int(budget),
        max_call_s=args.max_call_seconds,
        seed=args.seed,
        quick=args.quick,
        notes=notes,
    )
    config.torch_dtype  # noqa: B018 - raises ValueError naming a bad --dtype
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    parts = [p for p in PARTS if getattr(args, p)] or list(PARTS)
    results = run_benchmark(config, parts)
    print(format_report(results))
    if args.output:
        paths = output_paths(args.output)
        write_json(results, paths["json"])
        write_chart(results, paths["png"])
        print(f"wrote {paths['json']} and {paths['png']}", file=sys.stderr)
    return 0
