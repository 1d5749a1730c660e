"""Plan, train, measure and tabulate the ablation runs.

Layout of ``--output DIR``:

- ``ablation.json``: the settings every run shares (a rerun with other settings is refused);
- ``runs/<mixer>[-k<topk>]-s<seed>/``: one ``biformer train`` run directory each, plus
  ``result.json`` (written atomically once the run is trained and measured: its presence is what
  "finished" means, so a killed ablation retrains nothing that finished, and a run killed mid-way
  resumes from its own last checkpoint);
- ``table.csv``, ``table.md``, ``accuracy_vs_throughput.png``: one row per variant (mixer, topk),
  over its seeds.

Runs are split between processes by ``shard = (index, count)``: run ``j`` of the plan belongs to
shard ``j % count``. Under ``torchrun`` the shard is ``(RANK, WORLD_SIZE)``; each process trains its
runs alone (no DDP). Every process rewrites the table from all finished results when its share is
done, so the last one to finish leaves the complete table.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoint import atomic_write
from ..errors import UserError
from . import skeleton
from .mixers import MIXERS, ROUTED_MIXERS, RoutedMixer

SETTINGS_FILE = "ablation.json"
RESULT_FILE = "result.json"
TABLE_COLUMNS = (
    "mixer", "topk", "params_M", "gflops", "flops_note", "img_per_s", "train_step_ms",
    "top1_mean", "top1_std", "seeds",
)
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"ablate: {message}", file=sys.stderr, flush=True)


@dataclass
class AblationSettings:
    """What every run of one ablation shares; ``mixers``, ``topks`` and ``seeds`` pick the runs."""

    output: str
    mixers: List[str] = field(default_factory=lambda: list(MIXERS))
    topks: List[int] = field(default_factory=lambda: [1, 4, 8])
    seeds: int = 3
    epochs: int = 20
    img_size: int = 64
    n_win: int = 4
    depths: List[int] = field(default_factory=lambda: list(skeleton.DIGITS_SKELETON["depths"]))
    embed_dims: List[int] = field(default_factory=lambda: list(skeleton.DIGITS_SKELETON["embed_dims"]))
    data: Optional[str] = None
    dataset: Optional[str] = None
    config: Optional[str] = None  # a `biformer train` YAML applied to every run
    device: str = "auto"
    bench_batch: int = 64
    bench_steps: int = 5

    def shared(self) -> Dict[str, Any]:
        """The settings a finished run depends on (not which runs, not where or how fast)."""
        keep = ("epochs", "img_size", "n_win", "depths", "embed_dims", "data", "dataset")
        values: Dict[str, Any] = {k: getattr(self, k) for k in keep}
        values["config"] = Path(self.config).read_text() if self.config else None
        return values


@dataclass(frozen=True)
class RunSpec:
    mixer: str
    topk: Optional[int]  # None: the mixer does not route
    seed: int

    @property
    def name(self) -> str:
        k = "" if self.topk is None else f"-k{self.topk}"
        return f"{self.mixer}{k}-s{self.seed}"


def plan_runs(mixers: Sequence[str], topks: Sequence[int], seeds: int) -> List[RunSpec]:
    """Every (mixer, topk, seed); topk only for the routed mixers. Seeds vary slowest, so the first
    shards of a partial ablation already cover every variant once."""
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise UserError(f"got mixer {unknown[0]!r}, expected names from {', '.join(MIXERS)}")
    if not mixers or not topks or seeds < 1:
        raise UserError(f"got {len(mixers)} mixers, {len(topks)} topk values and seeds={seeds}; expected at least 1 each")
    if any(k < 1 for k in topks):
        raise UserError(f"got topk values {list(topks)}, expected positive numbers of regions")
    variants: List[Tuple[str, Optional[int]]] = []
    for mixer in dict.fromkeys(mixers):
        variants += [(mixer, k) for k in dict.fromkeys(topks)] if mixer in ROUTED_MIXERS else [(mixer, None)]
    return [RunSpec(m, k, s) for s in range(seeds) for m, k in variants]


def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(t) for t in text.split("/"))
    except ValueError:
        raise UserError(f"got --shard {text!r}, expected I/N, e.g. 0/2") from None
    if not 0 <= index < count:
        raise UserError(f"got --shard {text!r}, expected 0 <= I < N")
    return index, count


def check_topks(settings: AblationSettings) -> None:
    """Every routed stage must have at least ``topk`` regions (the skeleton's maps halve per stage)."""
    if not any(m in ROUTED_MIXERS for m in settings.mixers):
        return
    side = math.ceil(settings.img_size / 4)  # the patch stem's stride
    top = max(settings.topks)
    for stage in range(3):
        rows = math.ceil(side / math.ceil(side / settings.n_win))  # regions holding real tokens, per side
        if top > rows * rows:
            raise UserError(f"got topk={top} but stage {stage + 1} ({side}x{side} tokens at img_size="
                            f"{settings.img_size}, n_win={settings.n_win}) has only {rows * rows} regions")
        side = math.ceil(side / 2)  # the 2x2 merge


# ---- one run ---------------------------------------------------------------------------------


def train_config(settings: AblationSettings, spec: RunSpec) -> Any:
    """The `biformer train` config of one run: the skeleton with this run's mixer, topk and seed."""
    from ..classification.config import build_config

    topk = spec.topk if spec.topk is not None else 1  # non-routed mixers ignore it
    overrides: Dict[str, Any] = dict(
        model=skeleton.MODEL_NAME,
        model_kwargs=dict(mixer=spec.mixer, depths=settings.depths, embed_dims=settings.embed_dims,
                          n_win=settings.n_win, topks=[topk, topk, topk, None]),
        epochs=settings.epochs,
        img_size=settings.img_size,
        seed=spec.seed,
        device=settings.device,
        output=str(run_dir(settings, spec)),
        progress=False,
        tensorboard=False,
    )
    for key in ("data", "dataset"):
        if getattr(settings, key) is not None:
            overrides[key] = getattr(settings, key)
    try:
        cfg = build_config(overrides, settings.config)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    return cfg


def run_dir(settings: AblationSettings, spec: RunSpec) -> Path:
    return Path(settings.output) / "runs" / spec.name


def _use_reference_backend(model: nn.Module) -> Dict[nn.Module, str]:
    """Routed ablation mixers on the explicit-matmul backend while counting FLOPs (BRA's own
    layers are switched by the counter itself)."""
    saved = {m: m.backend for m in model.modules() if isinstance(m, RoutedMixer)}
    for m in saved:
        m.backend = "reference"
    return saved


def count_model_flops(model: nn.Module, img_size: int) -> Tuple[float, str]:
    """Paper-compatible GFLOPs (``biformer.analysis.flops``) and a note on what it could not count."""
    from ..analysis.flops import count_flops

    saved = _use_reference_backend(model)
    try:
        report = count_flops(model, (img_size, img_size))
    except Exception as e:  # noqa: BLE001 (any tracing failure is reported in the table, not fatal)
        return math.nan, f"not counted: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    finally:
        for m, backend in saved.items():
            m.backend = backend
    # ops with arithmetic that neither count covers (shape/index ops carry none)
    arithmetic = sorted(op for op in report.uncounted_ops
                        if any(word in op for word in ("mm", "conv", "einsum", "attention", "linear", "matmul")))
    note = ("uncounted: " + ", ".join(arithmetic)) if arithmetic else ""
    return report.flops / 1e9, note


def measure_speed(model: nn.Module, img_size: int, batch: int, steps: int, device: torch.device) -> Tuple[float, float]:
    """Inference images/s (eval, no grad) and the median training step in ms (forward, backward,
    AdamW step) at ``batch`` images, on a copy of ``model``; 2 warm-up iterations each."""
    model = copy.deepcopy(model).to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model.eval()
    times = []
    with torch.no_grad():
        for i in range(steps + 2):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - start)
    img_per_s = batch / statistics.median(times)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(batch, dtype=torch.long, device=device)
    times = []
    for i in range(steps + 2):
        sync()
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return img_per_s, 1000 * statistics.median(times)


def train_and_measure(settings: AblationSettings, spec: RunSpec, device: torch.device, log: Log) -> Dict[str, Any]:
    """Train one run with the classification engine (resuming its own checkpoint when it has one),
    measure it, and write its ``result.json``."""
    from ..classification.training import resolve, train_in
    from ..engine.loop import STATE_FILE
    from ..engine.runtime import Runtime

    out = run_dir(settings, spec)
    cfg = resolve(train_config(settings, spec), 1, str(out))
    resume = (out / STATE_FILE).is_file()
    runtime = Runtime(device=device)  # one process per run: shards split runs, not batches
    # the run folder is the ablation's own: a run killed before its first checkpoint starts again
    started = time.perf_counter()
    engine = train_in(runtime, cfg, resume=resume, overwrite=not resume, note=log)
    train_seconds = time.perf_counter() - started
    state = engine.state
    if not state.history:
        raise RuntimeError(f"run {spec.name} finished without an epoch of metrics")
    model = engine.model
    gflops, note = count_model_flops(model, cfg.img_size)
    img_per_s, step_ms = measure_speed(model, cfg.img_size, settings.bench_batch, settings.bench_steps, device)
    last = state.history[-1]
    result = dict(
        run=spec.name, mixer=spec.mixer, topk=spec.topk, seed=spec.seed,
        params=sum(p.numel() for p in model.parameters()), gflops=gflops, flops_note=note,
        img_per_s=img_per_s, train_step_ms=step_ms, bench_batch=settings.bench_batch,
        top1=float(last["val_top1"]), best_top1=float(state.best), epochs=int(last["epoch"]),
        train_seconds=train_seconds, resumed=resume, device=str(device),
        threads=torch.get_num_threads(), host=os.uname().nodename,
    )
    text = json.dumps(result, indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(out / RESULT_FILE, write)
    log(f"finished {spec.name}: top-1 {result['top1']:.2f}% | {gflops:.3f} GFLOPs | {img_per_s:.0f} img/s | "
        f"step {step_ms:.0f} ms")
    return result


# ---- the whole ablation ------------------------------------------------------------------------


def prepare_output(settings: AblationSettings) -> None:
    """Create ``output`` or check that it holds this same ablation (never reuse another's results)."""
    out = Path(settings.output)
    path = out / SETTINGS_FILE
    shared = settings.shared()
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in shared if saved.get(k) != shared[k])
        if changed:
            first = changed[0]
            raise UserError(f"{str(out)!r} holds an ablation run with {first}={saved.get(first)!r}, not "
                            f"{shared[first]!r}: finished runs would not match; use another --output")
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{str(out)!r} is not empty and holds no {SETTINGS_FILE}; pick a new --output")
    text = json.dumps(shared, indent=1)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def run_ablation(settings: AblationSettings, shard: Tuple[int, int] = (0, 1), log: Log = _stderr,
                 device: Optional[torch.device] = None) -> List[Dict[str, Any]]:
    """Train and measure this shard's unfinished runs, then rewrite the table. Returns all results."""
    from ..engine.runtime import resolve_device

    check_topks(settings)
    runs = plan_runs(settings.mixers, settings.topks, settings.seeds)
    prepare_output(settings)
    device = device or resolve_device(settings.device, int(os.environ.get("LOCAL_RANK", 0)))
    mine = runs[shard[0]::shard[1]]
    log(f"{len(runs)} runs in the plan, {len(mine)} in shard {shard[0]}/{shard[1]}, on {device}")
    for i, spec in enumerate(mine, 1):
        if (run_dir(settings, spec) / RESULT_FILE).is_file():
            log(f"skip {spec.name} ({i}/{len(mine)}): finished")
            continue
        log(f"train {spec.name} ({i}/{len(mine)})")
        train_and_measure(settings, spec, device, log)
    return write_table_until_stable(settings, runs, log)


def read_results(settings: AblationSettings, runs: Sequence[RunSpec]) -> List[Dict[str, Any]]:
    results = []
    for spec in runs:
        path = run_dir(settings, spec) / RESULT_FILE
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def write_table_until_stable(settings: AblationSettings, runs: Sequence[RunSpec], log: Log) -> List[Dict[str, Any]]:
    """Write the table, and again while other processes keep adding results: the last writer then
    always holds every result written before it finished."""
    results = read_results(settings, runs)
    while True:
        write_table(Path(settings.output), results, settings)
        again = read_results(settings, runs)
        if len(again) == len(results):
            break
        results = again
    pending = len(runs) - len(results)
    log(f"table of {len(results)} runs in {Path(settings.output) / 'table.md'}"
        + (f" ({pending} runs not finished yet)" if pending else ""))
    return results


def summarize(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (mixer, topk): measurements averaged over seeds, top-1 mean and sample std."""
    groups: Dict[Tuple[str, Optional[int]], List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["mixer"], r["topk"]), []).append(r)
    order = {name: i for i, name in enumerate(MIXERS)}
    rows = []
    for (mixer, topk), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] or 0)):
        top1 = [r["top1"] for r in rs]
        rows.append(dict(
            mixer=mixer,
            topk=topk,
            params_M=rs[0]["params"] / 1e6,
            gflops=rs[0]["gflops"],
            flops_note=rs[0]["flops_note"],
            img_per_s=statistics.fmean(r["img_per_s"] for r in rs),
            train_step_ms=statistics.fmean(r["train_step_ms"] for r in rs),
            top1_mean=statistics.fmean(top1),
            top1_std=statistics.stdev(top1) if len(top1) > 1 else math.nan,
            seeds=len(rs),
        ))
    return rows


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Dict[str, Any]], settings: AblationSettings) -> str:
    lines = [
        f"Ablation: {settings.img_size}px, n_win={settings.n_win}, {settings.epochs} epochs, "
        f"data: {settings.data or settings.dataset or 'digits'}. img/s: inference at batch {settings.bench_batch}; "
        "step: forward+backward+AdamW at the same batch; top-1: last epoch, mean ± sample std over seeds.",
        "",
        "| mixer | topk | params (M) | GFLOPs | img/s | train step (ms) | top-1 (%) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gflops = _cell(r["gflops"], 4) + (f" ({r['flops_note']})" if r["flops_note"] else "")
        std = "" if math.isnan(r["top1_std"]) else f" ± {r['top1_std']:.2f}"
        lines.append(f"| {r['mixer']} | {_cell(r['topk'])} | {r['params_M']:.3f} | {gflops} | {r['img_per_s']:.0f} | "
                     f"{r['train_step_ms']:.0f} | {r['top1_mean']:.2f}{std} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, results: Sequence[Dict[str, Any]], settings: AblationSettings) -> List[Dict[str, Any]]:
    """``table.csv``, ``table.md`` and ``accuracy_vs_throughput.png``, each replaced atomically."""
    import csv
    import io

    rows = summarize(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(TABLE_COLUMNS))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                         for k in TABLE_COLUMNS})
    for name, text in (("table.csv", buffer.getvalue()), ("table.md", markdown_table(rows, settings))):
        def write(tmp: str, text: str = text) -> None:
            with open(tmp, "w", newline="") as f:
                f.write(text)

        atomic_write(out / name, write)
    if rows:
        atomic_write(out / "accuracy_vs_throughput.png", lambda tmp: _plot(rows, tmp))
    return rows


def _plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    markers = dict(zip(MIXERS, "os^vD<>Px"))
    for r in rows:
        std = 0.0 if math.isnan(r["top1_std"]) else r["top1_std"]
        label = r["mixer"] + ("" if r["topk"] is None else f" k={r['topk']}")
        ax.errorbar(r["img_per_s"], r["top1_mean"], yerr=std, marker=markers.get(r["mixer"], "o"), capsize=3,
                    linestyle="none", label=label)
    ax.set_xlabel("measured inference throughput (img/s, this machine)")
    ax.set_ylabel("top-1 (%), mean ± std over seeds")
    ax.set_title("token mixer ablation (small data: not ImageNet evidence)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


__all__ = [
    "AblationSettings",
    "RESULT_FILE",
    "RunSpec",
    "TABLE_COLUMNS",
    "parse_shard",
    "plan_runs",
    "run_ablation",
    "summarize",
    "train_config",
    "write_table",
]
