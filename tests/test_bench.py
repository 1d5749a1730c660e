"""biformer bench: its baselines are faithful, and a small run yields tables, JSON, a chart and targets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import biformer  # noqa: F401 - registers the models
from biformer.bench.baseline import full_attention, original_bra, original_bra_peak_bytes, use_original_bra
from biformer.bench.report import compute_targets, format_report
from biformer.bench.runner import run_benchmark
from biformer.bench.suites import BenchConfig, LayerCase, geometric_mean
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
