"""Report of ``biformer bench``: text tables, the speed and memory targets, JSON and a PNG chart."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .suites import FULL_ATTENTION, ORIGINAL, OURS, geometric_mean, infer_mode, original_name, train_mode
from .._extras import require

__all__ = ["Target", "compute_targets", "format_report", "write_json", "write_chart"]

SWIN = "swin_tiny_patch4_window7_224"
TINY, SMALL = "biformer_tiny", "biformer_small"
GB = 2 ** 30


# --------------------------------------------------------------------------------------------
# targets


@dataclass
class Target:
    """One row of the targets table: ours and the original, measured in the same run."""

    measure: str
    ours: Optional[float]
    original: Optional[float]
    goal: float
    direction: str  # "<=", ">=" or "<"
    unit: str  # "x", "GB" or "%"
    note: str = ""

    @property
    def passed(self) -> Optional[bool]:
        if self.ours is None:
            return None
        return {"<=": self.ours <= self.goal, ">=": self.ours >= self.goal, "<": self.ours < self.goal}[self.direction]

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _model_value(results: Dict[str, Any], name: str, mode: str, key: str) -> Optional[float]:
    entry = results.get("models", {}).get("candidates", {}).get(name, {}).get(mode, {})
    return entry.get(key) if entry.get("status") == "ok" else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _layer_entry(results: Dict[str, Any], case: str) -> Optional[Dict[str, Any]]:
    return next((c for c in results.get("layers", []) if c["case"]["name"] == case), None)


def compute_targets(results: Dict[str, Any]) -> List[Target]:
    """The measures the targets are set for, from a results dict (``None`` where a part did not run)."""
    config = results["config"]
    train = train_mode(config["train_batch"])
    infer = infer_mode(max(config["infer_batches"]))
    rows: List[Target] = []

    def model_ratio(measure: str, model: str, mode: str, key: str, goal: float, direction: str) -> None:
        ref = _model_value(results, SWIN, mode, key)
        values = [_ratio(_model_value(results, m, mode, key), ref) for m in (model, original_name(model))]
        rows.append(Target(measure, values[0], values[1], goal, direction, "x"))

    b = config["train_batch"]
    model_ratio(f"BiFormer-S training step (batch {b}) time vs Swin-T", SMALL, train, "median_s", 1.0, "<=")
    model_ratio(f"BiFormer-T training step (batch {b}) time vs Swin-T", TINY, train, "median_s", 0.6, "<=")
    bi = max(config["infer_batches"])
    model_ratio(f"BiFormer-T inference throughput (batch {bi}) vs Swin-T", TINY, infer, "img_per_s", 1.6, ">=")
    model_ratio(f"BiFormer-S inference throughput (batch {bi}) vs Swin-T", SMALL, infer, "img_per_s", 1.0, ">=")
    model_ratio(f"BiFormer-S training peak memory (batch {b}) vs Swin-T", SMALL, train, "peak_bytes", 1.0, "<=")

    speedups = []
    for case in ("S1", "S2", "S3"):
        entry = _layer_entry(results, case)
        if entry is None:
            continue
        cands = entry["candidates"]
        ours, orig = cands.get(OURS, {}).get("fwd_bwd", {}), cands.get(ORIGINAL, {}).get("fwd_bwd", {})
        if ours.get("status") == "ok" and orig.get("status") == "ok":
            speedups.append(orig["median_s"] / ours["median_s"])
    rows.append(Target("BRA layer fwd+bwd speed-up vs the original, S1-S3 (geometric mean)",
                       geometric_mean(speedups) if len(speedups) == 3 else None, 1.0 if speedups else None,
                       5.0, ">=", "x"))

    large = _layer_entry(results, "L600x500")
    ours_gb = orig_gb = None
    note = ""
    if large is not None:
        ours = large["candidates"].get(OURS, {}).get("fwd_bwd", {})
        if ours.get("status") == "ok" and ours.get("peak_bytes") is not None:
            ours_gb = ours["peak_bytes"] / GB
        orig = large["candidates"].get(ORIGINAL, {})
        if orig.get("fwd_bwd", {}).get("status") == "ok":
            orig_gb = orig["fwd_bwd"]["peak_bytes"] / GB
        elif "estimated_peak_bytes" in orig:
            orig_gb = orig["estimated_peak_bytes"]["fwd_bwd"] / GB
            note = "original: analytic estimate, not run"
    rows.append(Target("BRA layer 1x32x600x500 fwd+bwd peak memory", ours_gb, orig_gb, 2.0, "<", "GB", note))

    eff = results.get("models", {}).get("efficiency", {}).get("models", {})
    frac = [eff.get(n, {}).get("fraction_of_matmul") for n in (SMALL, original_name(SMALL))]
    rows.append(Target("BiFormer-S inference MAC/s vs plain matmul MAC/s",
                       None if frac[0] is None else 100 * frac[0], None if frac[1] is None else 100 * frac[1],
                       85.0, ">=", "%"))
    return rows


# --------------------------------------------------------------------------------------------
# text


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def _ms(entry: Dict[str, Any]) -> str:
    if entry.get("status") != "ok":
        return "-"
    return f"{1e3 * entry['median_s']:.1f}"


def _mb(nbytes: Optional[float]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:,.0f}"


def _status(entries: Sequence[Dict[str, Any]]) -> str:
    bad = [e for e in entries if e.get("status") != "ok"]
    if not bad:
        return "ok"
    reason = str(bad[0].get("reason", "")).strip().splitlines()
    first = reason[0] if reason else ""
    return f"{bad[0]['status']}: {first[:150]}{'...' if len(first) > 150 or len(reason) > 1 else ''}"  # full text in the JSON


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "n/a"
    return {"x": f"{value:.2f}x", "GB": f"{value:.2f} GB", "%": f"{value:.0f}%"}[unit]


def _layer_section(layers: List[Dict[str, Any]]) -> List[str]:
    out = []
    for entry in layers:
        case, cands = entry["case"], entry["candidates"]
        modes = case["modes"]
        orig = cands.get(ORIGINAL, {})
        headers = ["candidate"]
        for mode in modes:
            label = "fwd" if mode == "fwd" else "fwd+bwd"
            headers += [f"{label} ms", f"{label} peak MB", f"{label} vs orig"]
        headers += ["max |diff|", "status"]
        rows = []
        for name, cand in cands.items():
            row = [name]
            for mode in modes:
                e = cand[mode]
                ref = orig.get(mode, {})
                speed = (f"{ref['median_s'] / e['median_s']:.2f}x"
                         if e.get("status") == "ok" and ref.get("status") == "ok" else "-")
                peak = _mb(e.get("peak_bytes"))
                if name == ORIGINAL and e.get("status") != "ok" and "estimated_peak_bytes" in cand:
                    peak = f"~{_mb(cand['estimated_peak_bytes'][mode])} (est.)"
                row += [_ms(e), peak, speed]
            diff = cand.get("max_abs_diff_vs_original")
            row += ["-" if diff is None else f"{diff:.1e}", _status([cand[m] for m in modes])]
            rows.append(row)
        out += [f"BRA layer {case['name']}: {entry['shape']}", _table(headers, rows), ""]
    return out


def _model_section(models: Dict[str, Any]) -> List[str]:
    modes = models["modes"]
    headers = ["model", "params M"]
    for mode in modes:
        kind, batch = mode.split("_b")
        headers += ([f"b{batch} img/s", f"b{batch} infer peak MB"] if kind == "infer"
                    else [f"train b{batch} s/step", f"train b{batch} peak MB"])
    headers.append("status")
    rows = []
    for name, cand in models["candidates"].items():
        row = [name, f"{cand['params'] / 1e6:.1f}"]
        for mode in modes:
            e = cand.get(mode, {"status": "not run"})  # ONNX Runtime has no training step
            ok = e.get("status") == "ok"
            if mode.startswith("infer"):
                row += [f"{e['img_per_s']:.1f}" if ok else "-", _mb(e.get("peak_bytes"))]
            else:
                row += [f"{e['median_s']:.3f}" if ok else "-", _mb(e.get("peak_bytes"))]
        row.append(_status([cand[m] for m in modes if m in cand]))
        rows.append(row)
    out = [f"Whole models at {models['image_size']}x{models['image_size']}", _table(headers, rows), ""]
    if "efficiency" in models:
        eff = models["efficiency"]
        matmul = models.get("matmul", {})
        rate = eff.get("matmul_macs_per_s")
        out.append(f"Efficiency ({eff['mode']}, MACs from {eff['mac_source']}); plain {matmul.get('size')}^3 matmul: "
                   + ("n/a" if rate is None else f"{rate / 1e9:.1f} GMAC/s"))
        rows = [[name, f"{e['macs_per_image'] / 1e9:.2f}", "-" if e["img_per_s"] is None else f"{e['img_per_s']:.1f}",
                 "-" if e["macs_per_s"] is None else f"{e['macs_per_s'] / 1e9:.1f}",
                 "-" if e["fraction_of_matmul"] is None else f"{100 * e['fraction_of_matmul']:.0f}%"]
                for name, e in eff["models"].items()]
        out += [_table(["model", "GMAC/image", "img/s", "GMAC/s", "of matmul"], rows), ""]
    return out


def format_report(results: Dict[str, Any]) -> str:
    """Everything as text: the run's conditions, each part's table, then the targets."""
    meta, config = results["meta"], results["config"]
    out = [
        f"biformer bench: torch {meta['torch']}, timm {meta.get('timm')}, {meta['device_name']}, "
        f"{config['threads']} threads, {config['dtype']}, {config['repeats']} rounds (medians)"
        + (" [--quick: reduced shapes, not the target configuration]" if config["quick"] else ""),
        f"load average before/after: {meta.get('loadavg_before')} / {meta.get('loadavg_after')}; "
        f"wall time {meta.get('duration_s', 0):.0f} s",
        "peak memory: " + meta["memory_method"],
        "",
    ]
    out += [f"note: {n}" for n in config.get("notes", [])]
    if results.get("layers"):
        out += _layer_section(results["layers"])
    if results.get("models"):
        out += _model_section(results["models"])
    targets = results.get("targets", [])
    if targets:
        rows = [[t["measure"], _fmt(t["ours"], t["unit"]), _fmt(t["original"], t["unit"]),
                 f"{t['direction']} {_fmt(t['goal'], t['unit'])}",
                 {True: "pass", False: "MISS", None: "n/a"}[t["passed"]] + (f" ({t['note']})" if t["note"] else "")]
                for t in targets]
        out += ["Targets; ratios from this run",
                _table(["measure", "ours", "original (same run)", "target", "pass/miss"], rows), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# files


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def write_json(results: Dict[str, Any], path: str) -> None:
    from ..checkpoint import atomic_write

    text = json.dumps(results, indent=1, default=_json_default)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_chart(results: Dict[str, Any], path: str) -> None:
    """A PNG with one panel per measured quantity; missing parts leave a labelled empty panel."""
    require("matplotlib", extra="bench")  # one clear error when the extra is absent
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    layers = results.get("layers", [])
    _layer_panel(axes[0, 0], layers, "fwd_bwd", lambda e: e.get("median_s"), "BRA layer fwd+bwd time (s, log)")
    _layer_panel(axes[0, 1], layers, "fwd_bwd", lambda e: e.get("peak_bytes") and e["peak_bytes"] / 2 ** 20,
                 "BRA layer fwd+bwd peak memory (MB, log; hatched = original, estimated)", estimates=True)
    models = results.get("models", {})
    config = results["config"]
    infer, train = infer_mode(max(config["infer_batches"])), train_mode(config["train_batch"])
    _model_panel(axes[0, 2], models, infer, "img_per_s", f"inference throughput, {infer} (img/s)")
    _model_panel(axes[1, 0], models, train, "median_s", f"training step, {train} (s)")
    _model_panel(axes[1, 1], models, train, "peak_bytes", f"training peak memory, {train} (MB)", scale=2 ** -20)
    eff = models.get("efficiency", {}).get("models", {})
    ax = axes[1, 2]
    names = [n for n, e in eff.items() if e.get("fraction_of_matmul")]
    ax.bar(range(len(names)), [100 * eff[n]["fraction_of_matmul"] for n in names], color=_colors(names))
    ax.axhline(85, color="k", ls="--", lw=1)
    _finish(ax, names, "model MAC/s as % of matmul MAC/s (dashed: target 85%)")
    title = (f"biformer bench - {results['meta']['device_name']}, {config['threads']} threads, {config['dtype']}"
             + (" (--quick)" if config["quick"] else ""))
    fig.suptitle(title)
    fig.tight_layout()
    from ..checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def _colors(names: Sequence[str]) -> List[str]:
    return ["tab:red" if ORIGINAL in n else "tab:gray" if n in (FULL_ATTENTION, SWIN, "convnext_tiny")
            else "tab:blue" for n in names]


def _finish(ax: Any, names: Sequence[str], title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_patch4_window7_224", "") for n in names], rotation=30, ha="right", fontsize=8)
    if not names:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _layer_panel(ax: Any, layers: List[Dict[str, Any]], mode: str, value: Callable[[Dict[str, Any]], Any],
                 title: str, estimates: bool = False) -> None:
    cases = [c for c in layers if mode in c["case"]["modes"]]
    names = sorted({n for c in cases for n in c["candidates"]}, key=lambda n: (n != ORIGINAL, n != OURS, n))
    width = 0.8 / max(len(names), 1)
    cmap = __import__("matplotlib").colormaps["tab10"]
    for i, name in enumerate(names):
        xs, ys, hatched = [], [], []
        for j, case in enumerate(cases):
            cand = case["candidates"].get(name)
            if cand is None:
                continue
            v = value(cand[mode]) if cand[mode].get("status") == "ok" else None
            est = False
            if v is None and estimates and "estimated_peak_bytes" in cand:
                v, est = cand["estimated_peak_bytes"][mode] / 2 ** 20, True
            if v:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(v)
                hatched.append(est)
        color = "tab:red" if name == ORIGINAL else cmap([0, 1, 2, 4, 5, 6, 7, 8, 9][i % 9])  # red: the original only
        bars = ax.bar(xs, ys, width, label=name, color=color)
        for bar, est in zip(bars, hatched):
            if est:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
    ax.set_yscale("log")
    _finish(ax, [c["case"]["name"] for c in cases], title)
    if names and cases:
        ax.legend(fontsize=7)


def _model_panel(ax: Any, models: Dict[str, Any], mode: str, key: str, title: str, scale: float = 1.0) -> None:
    cands = models.get("candidates", {})
    names = [n for n, c in cands.items() if c.get(mode, {}).get("status") == "ok" and c[mode].get(key)]
    ax.bar(range(len(names)), [cands[n][mode][key] * scale for n in names], color=_colors(names))
    _finish(ax, names, title)


def output_paths(directory: str) -> Dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    return {"json": os.path.join(directory, "bench.json"), "png": os.path.join(directory, "bench.png")}
