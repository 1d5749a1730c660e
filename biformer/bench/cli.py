"""``biformer bench``: BRA backends and whole models against the original algorithm, Swin-T and ConvNeXt-T.

Prints tables and the speed and memory targets to stdout (progress goes to stderr). With ``--output
DIR`` (and only then) every finished measurement is appended at once to ``DIR/bench.csv`` and
``bench.jsonl`` (timm ``benchmark.py``-style rows, see :mod:`.rows`), so an interrupted run keeps what
it measured, and ``bench.json`` and ``bench.png`` are written at the end. ``--table targets`` measures
the table of the speed targets instead and prints it as markdown (``table.md`` in ``DIR``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING, List, Optional

from ..errors import UserError, UserValueError
from .rows import RowWriter

if TYPE_CHECKING:  # torch loads when the command runs, so --help answers at once
    from .suites import BenchConfig

# Named here without importing the modules that define them (they import torch); a test checks they agree.
PARTS = ("layers", "models", "efficiency")  # .runner.PARTS
TABLES = ("targets",)  # .table.TABLES
AMP_NAMES = ("bf16", "fp16")  # the keys of .runtimes.AMP_DTYPES
MODELS = ("biformer_tiny", "biformer_small", "swin_tiny_patch4_window7_224", "convnext_tiny")  # .suites.MODELS
QUICK_REPEATS, QUICK_LAYER_BATCH, QUICK_TRAIN_BATCH = 3, 2, 2
QUICK_MODELS = ("biformer_tiny", "swin_tiny_patch4_window7_224")  # --quick: one of ours against the reference
TABLE_REPEATS, TABLE_QUICK_REPEATS = 7, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Parts (default: all): --layers (BRA layer at the BiFormer-T stage shapes and two large maps), "
                     "--models (BiFormer-T/S, their originals, Swin-T, ConvNeXt-T), --efficiency (model MAC/s "
                     "against a plain matmul). Timings are medians of interleaved rounds in one process.")
    parts = parser.add_argument_group("parts")
    for part in PARTS:
        parts.add_argument(f"--{part}", action="store_true", help=f"run the {part} part")
    parser.add_argument("--quick", action="store_true",
                        help=f"small fast run (under 3 minutes on 2 cores): layers at batch {QUICK_LAYER_BATCH}, "
                             f"no large maps, models {' and '.join(QUICK_MODELS)} (unless --models-list) at batch 8 "
                             f"and training at batch {QUICK_TRAIN_BATCH}, {QUICK_REPEATS} rounds; with --table, "
                             f"{TABLE_QUICK_REPEATS} rounds and one RSS process per model")
    parser.add_argument("--table", choices=TABLES,
                        help="measure the speed-targets table (ours, Swin-T and the original) in one run and print it as markdown "
                             "(224x224, batch 8, 2 threads unless overridden; ~15-25 minutes, --quick for a check)")
    settings = parser.add_argument_group("how models run (each adds candidates next to eager fp32, interleaved)")
    settings.add_argument("--compile", action="store_true", help="also torch.compile (inductor) each model")
    settings.add_argument("--amp", choices=AMP_NAMES,
                          help="also run each model under torch.autocast with this dtype (fp16 needs a GPU)")
    settings.add_argument("--onnx", action="store_true",
                          help="also export each model to ONNX and run it in ONNX Runtime (CPU EP, intra-op threads "
                               "= --threads; inference only; needs the [export] extra)")
    settings.add_argument("--model-backends", nargs="+", metavar="NAME", default=[],
                          help="also run the BiFormer models with every BRA layer on this backend (e.g. sdpa flex)")
    settings.add_argument("--no-train", action="store_true", help="models part: inference only (no training step)")
    settings.add_argument("--no-macs", action="store_true", help="leave the gmacs column empty (saves the counting)")
    parser.add_argument("--no-large-maps", action="store_true", help="skip the 448x448 and 600x500 layer cases")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="BRA backends to measure (default: every one biformer.ops.available_backends() lists)")
    parser.add_argument("--models-list", nargs="+", metavar="NAME", dest="model_names",
                        help=f"timm model names for the model part (default: {' '.join(MODELS)})")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: 7, --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls per candidate, the memory pass included (default: 2)")
    parser.add_argument("--large-repeats", type=int, default=2,
                        help="timed rounds for the large-map layer cases (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto: cuda when available, else cpu "
                        "(default: %(default)s)")
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
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="write bench.csv and bench.jsonl (appended row by row), bench.json, bench.png or "
                             "table.json and table.md here (default: nothing is written; the tables are printed)")
    parser.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    import torch

    from .harness import available_memory_bytes
    from .runtimes import Setting, check_amp, require_onnx
    from .suites import T_STAGE_CASES, BenchConfig

    for name in ("threads", "repeats", "warmup", "large_repeats", "image_size", "batch", "matmul_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserValueError(f"got --{name.replace('_', '-')}={value}, expected a positive integer")
    for name in ("memory_budget_gb", "max_call_seconds"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UserValueError(f"got --{name.replace('_', '-')}={value}, expected a positive number")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UserValueError(f"got --device {args.device!r}, expected cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("got --device cuda, but CUDA is not available here; use --device cpu")
    check_amp(args.amp, device)
    if args.onnx or args.table:
        require_onnx()
    settings = [Setting()]
    for compiled in ([False, True] if args.compile else [False]):
        for amp in ([None, args.amp] if args.amp else [None]):
            if compiled or amp:
                settings.append(Setting(compile=compiled, amp=amp))
    if args.onnx:
        settings.append(Setting(runtime="onnx"))
    model_names = args.model_names or (list(QUICK_MODELS) if args.quick else list(MODELS))
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
    if args.table:
        default_repeats = TABLE_QUICK_REPEATS if args.quick else TABLE_REPEATS
    else:
        default_repeats = QUICK_REPEATS if args.quick else 7
    config = BenchConfig(
        device=str(device),
        dtype=args.dtype,
        threads=args.threads,
        repeats=args.repeats or default_repeats,
        warmup=args.warmup or 2,
        large_repeats=args.large_repeats,
        layer_cases=cases,
        backends=tuple(args.backends) if args.backends else None,
        models=tuple(model_names),
        image_size=args.image_size,
        infer_batches=(1, args.batch),
        train_batch=QUICK_TRAIN_BATCH if args.quick and not args.table else args.batch,
        matmul_size=args.matmul_size,
        mac_source=args.macs_source,
        memory_budget_bytes=int(budget),
        max_call_s=args.max_call_seconds,
        seed=args.seed,
        quick=args.quick,
        settings=tuple(settings),
        model_backends=tuple(args.model_backends),
        count_macs=not args.no_macs,
        train=not args.no_train,
        notes=notes,
    )
    config.torch_dtype  # noqa: B018 - raises ValueError naming a bad --dtype
    return config


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from .report import format_report, output_paths, write_chart, write_json
    from .runner import run_benchmark
    from .runtimes import ONNX_CACHE

    config = config_from_args(args)
    writer = RowWriter(args.output) if args.output else None  # nothing is written unless --output is given
    if writer is not None:
        _log(f"[bench] rows are appended to {writer.csv_path} and {writer.jsonl_path} as they finish")
    try:
        if args.table:
            return _run_table(args, config, writer)
        parts = [p for p in PARTS if getattr(args, p)] or list(PARTS)
        results = run_benchmark(config, parts, log=_log, sink=writer.write if writer else None)
    finally:
        if writer is not None:
            writer.close()
        ONNX_CACHE.close()
    print(format_report(results))
    if args.output:
        paths = output_paths(args.output)
        write_json(results, paths["json"])
        write_chart(results, paths["png"])
        _log(f"wrote {paths['json']} and {paths['png']}")
    return 0


def _run_table(args: argparse.Namespace, config: BenchConfig, writer: Optional[RowWriter]) -> int:
    import torch

    from ..checkpoint import atomic_write
    from .report import write_json
    from .runner import run_metadata
    from .table import format_table, run_table

    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    meta = run_metadata(config)
    try:
        measured = run_table(args.table, config, _log, sink=writer.write if writer else None,
                             rss_repeats=1 if args.quick else 3)
    finally:
        torch.set_num_threads(threads_before)
    meta.finish()
    text = format_table(measured)
    header = f"biformer bench --table {args.table}: {meta.summary()}"
    print(header + "\n\n" + text)
    if not args.output:
        return 0
    json_path = os.path.join(args.output, "table.json")
    write_json({"meta": meta.data, "config": config.to_dict(), "table": measured}, json_path)

    def write_md(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(header + "\n\n" + text + "\n")

    md_path = os.path.join(args.output, "table.md")
    atomic_write(md_path, write_md)
    _log(f"wrote {json_path} and {md_path}")
    return 0
