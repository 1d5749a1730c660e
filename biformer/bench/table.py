"""``biformer bench --table targets``: the speed and memory targets, in one run, as a markdown table.

Every ratio's two sides are measured in the same interleaved group (medians of the rounds, with the
spread in the rows): eager BiFormer-S/T, Swin-T and the original algorithm; eager against compiled;
fp32 against bf16 autocast; ONNX Runtime. Training memory is the RSS growth of a fresh process per
measurement (:mod:`.rss`), alternating the models. Rows stream to ``bench.csv``/``bench.jsonl``
as each group ends.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .rows import measurement_row
from .rss import measure_rss
from .runtimes import Setting
from .suites import BenchConfig, ModelCandidate, ModelPool, RowSink, infer_mode, run_model_group, train_mode

__all__ = ["TABLES", "run_table", "format_table"]

SMALL, TINY, SWIN = "biformer_small", "biformer_tiny", "swin_tiny_patch4_window7_224"
EAGER, COMPILED, BF16, ORT = Setting(), Setting(compile=True), Setting(amp="bf16"), Setting(runtime="onnx")
TABLES = ("targets",)
Log = Callable[[str], None]


@dataclass(frozen=True)
class Group:
    name: str
    candidates: Tuple[ModelCandidate, ...]
    modes: Tuple[str, ...]  # "infer" and/or "train"


def _groups() -> List[Group]:
    both = ("infer", "train")
    return [
        Group("eager", tuple(ModelCandidate(m) for m in (SMALL, TINY, SWIN)), both),
        Group("original", (ModelCandidate(SMALL), ModelCandidate(SMALL, original=True)), ("train",)),
        Group("bf16", tuple(ModelCandidate(m, s) for m in (SMALL, TINY, SWIN) for s in (EAGER, BF16)), ("infer",)),
        Group("onnx", tuple(ModelCandidate(m, s) for m in (SMALL, TINY, SWIN) for s in (EAGER, ORT)), ("infer",)),
        Group("compile", tuple(ModelCandidate(m, s) for m in (SMALL, SWIN) for s in (EAGER, COMPILED)), both),
    ]


def _mode(kind: str, batch: int) -> str:
    return infer_mode(batch) if kind == "infer" else train_mode(batch)


def _rss_group(config: BenchConfig, models: Sequence[str], repeats: int, log: Log,
               sink: Optional[RowSink]) -> Dict[str, Dict[str, Any]]:
    """First-step and steady-state RSS growth of training, a fresh process per run, models alternating."""
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in models}
    for r in range(repeats):
        for model in (models if r % 2 == 0 else list(reversed(models))):
            try:
                runs[model].append(measure_rss(model, batch=config.train_batch, image_size=config.image_size,
                                               threads=config.threads))
                last = runs[model][-1]
                log(f"  rss {model}: first step {last['first_step_bytes'] / 2 ** 20:.0f} MB, "
                    f"steady {last['steady_step_bytes'] / 2 ** 20:.0f} MB")
            except Exception as e:  # noqa: BLE001 - one failed process must not end the table
                log(f"  rss {model}: failed ({e})")
    result: Dict[str, Dict[str, Any]] = {}
    for model, model_runs in runs.items():
        entry: Dict[str, Any] = {"runs": model_runs}
        for key in ("first_step_bytes", "steady_step_bytes"):
            values = [run[key] for run in model_runs if run.get(key) is not None]
            entry[key] = statistics.median(values) if values else None
            if sink is not None:
                outcome = {"status": "ok" if values else "failed", "reason": "" if values else "no run finished",
                           "peak_bytes": entry[key]}
                row = measurement_row(
                    model=model, mode="train_rss_" + key.split("_")[0], img_size=config.image_size,
                    batch_size=config.train_batch, outcome=outcome,
                    settings={"threads": config.threads, "device": "cpu", "dtype": config.dtype}, group="memory",
                    note=("RSS growth of a fresh process, median of "
                          f"{len(values)}: " + ", ".join(f"{v / 2 ** 20:.0f}" for v in values) + " MB"))
                sink(row, [])
        result[model] = entry
    return result


def run_table(name: str, config: BenchConfig, log: Log, sink: Optional[RowSink] = None,
              rss_repeats: int = 3) -> Dict[str, Any]:
    """Measure table ``name`` (see :data:`TABLES`); returns the outcomes by group and the memory."""
    if name not in TABLES:
        raise ValueError(f"got table {name!r}, expected one of {TABLES}")
    pool = ModelPool(config, log)
    batch = config.train_batch
    measured: Dict[str, Any] = {"groups": {}, "batch": batch, "image_size": config.image_size,
                                "repeats": config.repeats}
    for group in _groups():
        modes = [_mode(k, batch) for k in group.modes]
        outcomes = run_model_group(config, pool, group.candidates, modes, log, group=group.name, sink=sink)
        measured["groups"][group.name] = {k: v.to_dict() for k, v in outcomes.items()}
        if group.name == "eager":  # memory early: cheap, and it needs nothing compiled
            log(f"[memory] RSS of training, fresh processes, {rss_repeats} per model")
            measured["memory"] = _rss_group(config, [SMALL, SWIN], rss_repeats, log, sink)
    return measured


# --------------------------------------------------------------------------------------------
# the markdown table


def _median(measured: Dict[str, Any], group: str, candidate: ModelCandidate, kind: str) -> Optional[float]:
    entry = measured["groups"].get(group, {}).get(f"{candidate.name}/{_mode(kind, measured['batch'])}")
    return entry["median_s"] if entry and entry["status"] == "ok" else None


def _info(measured: Dict[str, Any], group: str, candidate: ModelCandidate, kind: str, key: str) -> Optional[float]:
    entry = measured["groups"].get(group, {}).get(f"{candidate.name}/{_mode(kind, measured['batch'])}")
    return (entry or {}).get("info", {}).get(key)


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _ips(measured: Dict[str, Any], seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{measured['batch'] / seconds:.1f}"


def table_rows(measured: Dict[str, Any]) -> List[Tuple[str, str, str, str, Optional[bool]]]:
    """(measure, ours, target, detail, met) per line of the speed-targets table."""
    rows: List[Tuple[str, str, str, str, Optional[bool]]] = []
    S, T, W = ModelCandidate(SMALL), ModelCandidate(TINY), ModelCandidate(SWIN)

    def med(group: str, c: ModelCandidate, kind: str) -> Optional[float]:
        return _median(measured, group, c, kind)

    def add(measure: str, value: Optional[float], goal: float, higher: bool, detail: str = "",
            fmt: Callable[[Optional[float]], str] = _x, target: str = "") -> None:
        met = None if value is None else (value >= goal if higher else value <= goal)
        rows.append((measure, fmt(value), target or f"{'≥' if higher else '≤'} {fmt(goal)}", detail, met))

    cS, cW = ModelCandidate(SMALL, COMPILED), ModelCandidate(SWIN, COMPILED)
    for kind in ("train", "infer"):
        what = "training step" if kind == "train" else "inference"
        s_gain = _div(med("compile", S, kind), med("compile", cS, kind))
        w_gain = _div(med("compile", W, kind), med("compile", cW, kind))
        add(f"`torch.compile(biformer_small)` {what} speed-up vs its own eager", s_gain, 1.2, True,
            f"Swin-T gains {_x(w_gain)} in the same group")
    add("compiled BiFormer-S training step time vs compiled Swin-T",
        _div(med("compile", cS, "train"), med("compile", cW, "train")), 1.0, False)
    add("compiled BiFormer-S inference throughput vs compiled Swin-T",
        _div(med("compile", cW, "infer"), med("compile", cS, "infer")), 1.0, True,
        f"{_ips(measured, med('compile', cS, 'infer'))} / {_ips(measured, med('compile', cW, 'infer'))} img/s")
    add("BiFormer-S eager training step time vs Swin-T", _div(med("eager", S, "train"), med("eager", W, "train")),
        1.0, False)
    add("BiFormer-T eager training step time vs Swin-T", _div(med("eager", T, "train"), med("eager", W, "train")),
        0.6, False)
    add("BiFormer-S eager inference throughput vs Swin-T", _div(med("eager", W, "infer"), med("eager", S, "infer")),
        1.0, True, f"BiFormer-T: {_x(_div(med('eager', W, 'infer'), med('eager', T, 'infer')))}")
    add("BiFormer-S training step speed-up vs the original algorithm",
        _div(med("original", ModelCandidate(SMALL, original=True), "train"), med("original", S, "train")), 4.0, True)

    memory = measured.get("memory", {})
    for key, label in (("first_step_bytes", "first step"), ("steady_step_bytes", "steady state")):
        s, w = memory.get(SMALL, {}).get(key), memory.get(SWIN, {}).get(key)
        add(f"BiFormer-S training peak memory vs Swin-T, {label} (RSS growth, fresh process)", _div(s, w), 1.0,
            False, "n/a" if s is None or w is None else f"{s / 2 ** 20:.0f} / {w / 2 ** 20:.0f} MB")

    bS, bT, bW = (ModelCandidate(m, BF16) for m in (SMALL, TINY, SWIN))
    gains = ", ".join(f"{n} {_x(_div(med('bf16', ModelCandidate(m), 'infer'), med('bf16', ModelCandidate(m, BF16), 'infer')))}"
                      for n, m in (("S", SMALL), ("T", TINY), ("Swin-T", SWIN)))
    add("bf16 autocast inference throughput, BiFormer-S vs Swin-T (both bf16)",
        _div(med("bf16", bW, "infer"), med("bf16", bS, "infer")), 1.0, True, f"bf16 speed-up over fp32: {gains}")
    add("bf16 autocast inference throughput, BiFormer-T vs Swin-T (both bf16)",
        _div(med("bf16", bW, "infer"), med("bf16", bT, "infer")), 1.6, True)

    oS, oT, oW = (ModelCandidate(m, ORT) for m in (SMALL, TINY, SWIN))
    ips = " / ".join(_ips(measured, med("onnx", c, "infer")) for c in (oS, oT, oW))
    add("ONNX Runtime inference throughput, BiFormer-S vs Swin-T", _div(med("onnx", oW, "infer"),
                                                                         med("onnx", oS, "infer")),
        1.0, True, f"S / T / Swin-T: {ips} img/s")
    add("ONNX Runtime inference throughput, BiFormer-T vs Swin-T", _div(med("onnx", oW, "infer"),
                                                                         med("onnx", oT, "infer")), 1.6, True)
    diffs = [_info(measured, "onnx", c, "infer", "max_rel_diff_vs_pytorch") for c in (oS, oT, oW)]
    worst = max((d for d in diffs if d is not None), default=None)
    add("ONNX Runtime outputs vs PyTorch, max relative difference (S, T, Swin-T)", worst, 1e-4, False,
        ", ".join("n/a" if d is None else f"{d:.1e}" for d in diffs), fmt=lambda v: "n/a" if v is None else f"{v:.1e}")
    return rows


def format_table(measured: Dict[str, Any]) -> str:
    """The speed-targets table as markdown: measure, ours, target, met, detail."""
    lines = [f"{measured['image_size']}², batch {measured['batch']}, medians of {measured['repeats']} interleaved "
             "rounds per group", "", "| measure | ours | target | met | detail |", "|---|---|---|---|---|"]
    for measure, ours, target, detail, met in table_rows(measured):
        lines.append(f"| {measure} | {ours} | {target} | {'n/a' if met is None else 'yes' if met else 'no'} "
                     f"| {detail} |")
    return "\n".join(lines)

