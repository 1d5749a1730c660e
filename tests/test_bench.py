"""biformer bench: its baselines are faithful, and a small run yields tables, JSON, a chart and targets."""
from __future__ import annotations

import argparse
import builtins
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import biformer  # noqa: F401 - registers the models
from biformer.bench import cli as bench_cli
from biformer.bench.baseline import full_attention, original_bra, original_bra_peak_bytes, use_original_bra
from biformer.bench.report import compute_targets, format_report
from biformer.bench.runner import run_benchmark
from biformer.bench.rss import measure_rss
from biformer.bench.table import format_table, table_rows
from biformer.bench.rows import COLUMNS, RowWriter, measurement_row, read_rows
from biformer.bench.runtimes import Setting, require_onnx
from biformer.bench.suites import BenchConfig, LayerCase, ModelCandidate, ModelPool, geometric_mean, run_model_group
from biformer.checkpoint import load_model
from biformer.errors import UserError
from biformer.cli import main as cli_main
from biformer.layers import BiLevelRoutingAttention


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_original_algorithm_baseline_computes_what_our_layer_computes(layout: str) -> None:
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=3, layout=layout)
    x = torch.randn(2, 32, 16, 12) if layout == "NCHW" else torch.randn(2, 16, 12, 32)
    torch.testing.assert_close(original_bra(layer, x), layer(x), atol=1e-5, rtol=1e-5)


def test_original_baseline_refuses_what_the_original_could_not_do() -> None:
    layer = BiLevelRoutingAttention(16, num_heads=2, n_win=4, topk=2)
    with pytest.raises(ValueError, match="multiple of n_win=4, got 10x12"):
        original_bra(layer, torch.randn(1, 16, 10, 12))


def test_full_attention_baseline_is_bra_with_every_region_routed() -> None:
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=4, layout="NHWC")  # 4 of 4 regions
    x = torch.randn(1, 8, 8, 16)
    torch.testing.assert_close(full_attention(layer, x), layer(x), atol=1e-5, rtol=1e-5)


def test_original_model_swap_keeps_weights_and_outputs() -> None:
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1), num_classes=5).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ours = model(x)
        assert use_original_bra(model) == 3  # one routed block per routed stage
        torch.testing.assert_close(model(x), ours, atol=1e-4, rtol=1e-4)


def test_original_peak_estimate_grows_with_the_map() -> None:
    kwargs = dict(qk_dim=32, num_heads=1, n_win=7, topk=4)
    small = original_bra_peak_bytes(1, 112, 112, 32, **kwargs)
    large = original_bra_peak_bytes(1, 448, 448, 32, **kwargs)
    # 16x the tokens: the attention matrix and the expanded-kv gradient grow with tokens squared
    assert large > 100 * small
    assert original_bra_peak_bytes(1, 448, 448, 32, backward=False, **kwargs) < large


def test_geometric_mean() -> None:
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([]) is None


def test_small_layer_run_reports_every_backend_and_the_targets() -> None:
    config = BenchConfig(
        repeats=1, warmup=1, threads=1, backends=("reference", "sdpa", "dense"),
        layer_cases=(LayerCase("S1", 1, 32, 28, 28, topk=2, num_heads=2),), models=(),
    )
    results = run_benchmark(config, ["layers"], log=lambda msg: None)
    (case,) = results["layers"]
    cands = case["candidates"]
    assert {"original", "full_sdpa", "auto", "reference", "sdpa", "dense"} <= set(cands)
    for name in ("reference", "sdpa", "dense", "original"):
        for mode in ("fwd", "fwd_bwd"):
            entry = cands[name][mode]
            assert entry["status"] == "ok", (name, mode, entry)
            assert entry["median_s"] > 0
    report = format_report(results)
    assert "BRA layer S1" in report and "Targets" in report
    targets = {t.measure: t for t in compute_targets(results)}
    assert any("geometric mean" in m for m in targets)


def test_bench_cli_writes_json_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    code = cli_main(["bench", "--layers", "--quick", "--backends", "sdpa", "--repeats", "1", "--warmup", "1",
                     "--threads", "1", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "BRA layer S3" in printed
    data = json.loads((out / "bench.json").read_text())
    assert [c["case"]["name"] for c in data["layers"]] == ["S1", "S2", "S3"]
    assert data["meta"]["calibration_matmul_macs_per_s"] > 0
    with Image.open(out / "bench.png") as image:
        assert image.width >= 400 and image.height >= 200


def test_bench_without_output_only_prints(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the former default folder, bench-results/, would have gone
    code = cli_main(["bench", "--layers", "--quick", "--backends", "sdpa", "--repeats", "1", "--warmup", "1",
                     "--threads", "1", "--device", "cpu"])
    assert code == 0
    assert "BRA layer S3" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# ---- timm-style rows, streamed ------------------------------------------------------------------


def test_measurement_row_follows_timm_units_and_reports_the_spread() -> None:
    outcome = {"status": "ok", "median_s": 0.25, "samples_s": [0.2, 0.25, 0.3, 0.5, 0.25], "peak_bytes": 3 * 2 ** 20}
    row = measurement_row(model="m", mode="infer", img_size=224, batch_size=8, outcome=outcome,
                          settings={"compile": True, "amp": "bf16", "threads": 2}, params=25_500_000,
                          macs_per_image=4.5e9)
    assert set(row) == set(COLUMNS)
    assert row["samples_per_sec"] == pytest.approx(32.0)  # batch / median step
    assert row["step_time"] == pytest.approx(250.0)  # ms, as timm reports it
    assert row["param_count"] == pytest.approx(25.5) and row["gmacs"] == pytest.approx(4.5)
    assert (row["step_time_min"], row["step_time_max"]) == (pytest.approx(200.0), pytest.approx(500.0))
    assert row["step_time_iqr"] == pytest.approx(50.0)  # quartiles 250 and 300 ms (linear interpolation)
    assert (row["compile"], row["amp"], row["runtime"], row["repeats"], row["peak_mb"]) == (True, "bf16", "eager", 5, 3.0)
    failed = measurement_row(model="m", mode="train", img_size=224, batch_size=8,
                             outcome={"status": "failed", "reason": "boom"}, settings={})
    assert failed["samples_per_sec"] is None and failed["status"] == "failed: boom"


def test_row_writer_appends_to_its_own_csv_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    row = measurement_row(model="m", mode="infer", img_size=32, batch_size=2,
                          outcome={"status": "ok", "median_s": 0.5, "samples_s": [0.5]}, settings={})
    for _ in range(2):  # a second run appends below the first, under one header
        with RowWriter(str(tmp_path)) as writer:
            writer.write(row, [0.5])
    rows = read_rows(str(tmp_path / "bench.csv"))
    assert len(rows) == 2 and rows[1]["samples_per_sec"] == "4.0"
    assert [json.loads(line)["samples_s"] for line in (tmp_path / "bench.jsonl").read_text().splitlines()] == [[0.5]] * 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "bench.csv").write_text("model,infer_samples_per_sec\nx,1\n")
    with pytest.raises(UserError, match="other columns"):
        RowWriter(str(other))
    assert (other / "bench.csv").read_text() == "model,infer_samples_per_sec\nx,1\n"  # untouched


def test_killed_bench_keeps_every_row_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "biformer", "bench", "--layers", "--quick", "--backends", "sdpa", "--repeats", "1",
           "--warmup", "1", "--threads", "1", "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    csv_path = out / "bench.csv"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 2:  # header + a first row
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the bench ended before it was killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "bench.json").exists()  # the run did not finish ...
    text = csv_path.read_text()
    assert text.endswith("\n")  # ... but no row is cut off
    rows = read_rows(str(csv_path))
    assert rows and all(None not in row and len(row) == len(COLUMNS) for row in rows)
    for row in rows:
        assert row["model"].startswith("bra_layer_S1:") and row["status"] == "ok"
        assert float(row["samples_per_sec"]) > 0 and float(row["step_time"]) > 0 and row["threads"] == "1"
    jsonl = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [r["model"] for r in jsonl] == [r["model"] for r in rows]


# ---- settings: compile, amp, onnx -------------------------------------------------------------------


def test_missing_onnx_runtime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(UserError, match=r"onnxruntime is missing.*biformer\[export\]"):
        require_onnx()


def test_bench_refuses_fp16_autocast_on_the_cpu_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["bench", "--models", "--amp", "fp16", "--device", "cpu", "--output", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--amp fp16 on the CPU" in err and "bf16" in err
    assert not (tmp_path / "b").exists()


def test_settings_are_the_product_of_compile_and_amp_plus_onnx() -> None:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    config = bench_cli.config_from_args(parser.parse_args(["--models", "--compile", "--amp", "bf16", "--onnx"]))
    labels = [s.label for s in config.settings]
    assert labels == ["", "bf16", "compiled", "compiled+bf16", "onnx"]  # eager fp32 first: the reference
    assert not Setting(runtime="onnx").trains
    with pytest.raises(UserError, match="ONNX Runtime runs the fp32 export"):
        Setting(runtime="onnx", amp="bf16")


def test_model_group_runs_every_setting_and_writes_a_row_each(tmp_path: Path) -> None:
    """bf16 autocast and ONNX Runtime beside eager fp32 on a small BiFormer, interleaved; rows stream out."""
    config = BenchConfig(repeats=1, warmup=1, threads=1, image_size=64, count_macs=False, models=())
    pool = ModelPool(config, log=lambda msg: None)
    small = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), head_dim=16, n_win=2, topks=(1, 2, 2, None))
    pool.add("tiny_test", timm.create_model("biformer_tiny", num_classes=10, **small))
    candidates = [ModelCandidate("tiny_test", s) for s in (Setting(), Setting(amp="bf16"), Setting(runtime="onnx"))]
    with RowWriter(str(tmp_path)) as writer:
        outcomes = run_model_group(config, pool, candidates, ["infer_b2", "train_b2"], log=lambda msg: None,
                                   group="test", sink=writer.write)
    rows = read_rows(str(tmp_path / "bench.csv"))
    assert [(r["runtime"], r["amp"], r["mode"]) for r in rows] == [
        ("eager", "none", "infer"), ("eager", "none", "train"), ("eager", "bf16", "infer"), ("eager", "bf16", "train"),
        ("onnx", "none", "infer")]  # ONNX Runtime has no training row
    assert all(r["status"] == "ok" and float(r["samples_per_sec"]) > 0 for r in rows), rows
    onnx_info = outcomes["tiny_test@onnx/infer_b2"].info
    assert onnx_info["max_rel_diff_vs_pytorch"] < 1e-4
    assert "max_rel_diff_vs_pytorch" in rows[-1]["note"]


@pytest.mark.slow
def test_compiled_model_trains_and_infers_in_the_bench(tmp_path: Path) -> None:
    config = BenchConfig(repeats=1, warmup=1, threads=2, image_size=64, count_macs=False, models=())
    pool = ModelPool(config, log=lambda msg: None)
    small = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), head_dim=16, n_win=2, topks=(1, 2, 2, None))
    pool.add("tiny_test", timm.create_model("biformer_tiny", num_classes=10, **small))
    candidates = [ModelCandidate("tiny_test"), ModelCandidate("tiny_test", Setting(compile=True))]
    outcomes = run_model_group(config, pool, candidates, ["infer_b2", "train_b2"], log=lambda msg: None, group="t")
    for mode in ("infer_b2", "train_b2"):
        compiled = outcomes[f"tiny_test@compiled/{mode}"]
        assert compiled.ok, compiled.reason
        assert compiled.setup_s is not None and compiled.median_s > 0


# ---- bf16 training on the CPU ------------------------------------------------------------------------


def test_train_with_bf16_autocast_on_the_cpu_saves_fp32_weights(tmp_path: Path) -> None:
    """Two updates on the bundled digits under --amp bf16: finite loss, fp32 weights that load and predict."""
    out = tmp_path / "run"
    tiny = "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 32, 32], head_dim: 16, n_win: 2, topks: [1, 2, 2, null]}"
    code = cli_main(["train", "--model-kwargs", tiny, "--batch-size", "640", "--epochs", "1", "--warmup-epochs", "0",
                     "--amp", "bf16", "--device", "cpu", "--no-model-ema", "--num-workers", "0", "--log-interval", "1",
                     "--no-progress", "--no-tensorboard", "--output", str(out)])
    assert code == 0
    steps = read_rows(str(out / "steps.csv"))
    assert len(steps) == 2  # 1437 digits, batch 640
    assert all(math.isfinite(float(s["loss"])) for s in steps)
    weights = load_file(out / "last.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    model, _ = load_model(out / "last.safetensors")
    with torch.no_grad():
        logits = model.eval()(torch.rand(2, 3, 32, 32))
    assert logits.dtype == torch.float32 and logits.shape == (2, 10) and torch.isfinite(logits).all()


# ---- the targets table ---------------------------------------------------------------------------------


def _measured(times: Dict[str, Dict[str, float]], memory: Dict[str, Dict[str, float]], diffs: Dict[str, float]) -> Dict[str, Any]:
    """A table_run result with the given median seconds per group and '<candidate>/<mode>' key."""
    groups: Dict[str, Any] = {}
    for group, entries in times.items():
        groups[group] = {key: {"status": "ok", "median_s": t, "info": {}} for key, t in entries.items()}
    for name, diff in diffs.items():
        groups["onnx"][f"{name}@onnx/infer_b8"]["info"]["max_rel_diff_vs_pytorch"] = diff
    return {"groups": groups, "memory": memory, "batch": 8, "image_size": 224, "repeats": 7}


def test_targets_table_takes_each_ratio_within_its_group() -> None:
    S, T, W = "biformer_small", "biformer_tiny", "swin_tiny_patch4_window7_224"
    measured = _measured(
        {"eager": {f"{S}/train_b8": 3.0, f"{T}/train_b8": 1.2, f"{W}/train_b8": 2.0,
                   f"{S}/infer_b8": 1.0, f"{T}/infer_b8": 0.4, f"{W}/infer_b8": 0.8},
         "original": {f"{S}/train_b8": 2.5, f"{S}:original/train_b8": 10.0},
         "compile": {f"{S}/train_b8": 3.0, f"{S}@compiled/train_b8": 2.0, f"{W}/train_b8": 2.0,
                     f"{W}@compiled/train_b8": 1.6, f"{S}/infer_b8": 1.0, f"{S}@compiled/infer_b8": 1.0,
                     f"{W}/infer_b8": 0.8, f"{W}@compiled/infer_b8": 0.5},
         "bf16": {f"{S}@bf16/infer_b8": 0.5, f"{T}@bf16/infer_b8": 0.2, f"{W}@bf16/infer_b8": 0.4,
                  f"{S}/infer_b8": 1.0, f"{T}/infer_b8": 0.4, f"{W}/infer_b8": 0.8},
         "onnx": {f"{S}@onnx/infer_b8": 1.0, f"{T}@onnx/infer_b8": 0.25, f"{W}@onnx/infer_b8": 0.5}},
        {S: {"first_step_bytes": 300.0, "steady_step_bytes": 200.0}, W: {"first_step_bytes": 200.0,
                                                                        "steady_step_bytes": 250.0}},
        {S: 3e-7, T: 2e-7, W: 5e-5})
    rows = {measure: (ours, met) for measure, ours, _, _, met in table_rows(measured)}
    assert rows["`torch.compile(biformer_small)` training step speed-up vs its own eager"] == ("1.50×", True)
    assert rows["`torch.compile(biformer_small)` inference speed-up vs its own eager"] == ("1.00×", False)
    assert rows["compiled BiFormer-S training step time vs compiled Swin-T"] == ("1.25×", False)
    assert rows["compiled BiFormer-S inference throughput vs compiled Swin-T"] == ("0.50×", False)
    assert rows["BiFormer-S eager training step time vs Swin-T"] == ("1.50×", False)
    assert rows["BiFormer-T eager training step time vs Swin-T"] == ("0.60×", True)
    assert rows["BiFormer-S training step speed-up vs the original algorithm"] == ("4.00×", True)  # 10 / 2.5
    assert rows["BiFormer-S training peak memory vs Swin-T, first step (RSS growth, fresh process)"] == ("1.50×", False)
    assert rows["BiFormer-S training peak memory vs Swin-T, steady state (RSS growth, fresh process)"] == ("0.80×", True)
    assert rows["bf16 autocast inference throughput, BiFormer-T vs Swin-T (both bf16)"] == ("2.00×", True)
    assert rows["ONNX Runtime inference throughput, BiFormer-S vs Swin-T"] == ("0.50×", False)
    assert rows["ONNX Runtime outputs vs PyTorch, max relative difference (S, T, Swin-T)"] == ("5.0e-05", True)
    text = format_table(measured)
    assert text.count("\n| ") == len(rows) + 1 and "| no |" in text and "| yes |" in text
    del measured["groups"]["onnx"]  # a group that did not run leaves its lines n/a, not wrong
    assert dict((m, o) for m, o, _, _, _ in table_rows(measured))["ONNX Runtime inference throughput, BiFormer-T vs Swin-T"] == "n/a"


def test_rss_of_a_fresh_training_process() -> None:
    result = measure_rss("biformer_tiny", batch=1, image_size=64, threads=1, steps=2)
    assert result["first_step_bytes"] > 0  # gradients and AdamW state at least
    assert len(result["step_bytes"]) == 2 and result["steady_step_bytes"] == result["step_bytes"][1]
    assert math.isfinite(result["loss"]) and result["baseline_rss_bytes"] > 0
