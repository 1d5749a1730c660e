"""FLOP counting (paper-compatible and complete), the BRA complexity model, and their commands."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import biformer  # noqa: F401  (registers the models)
from biformer import BiLevelRoutingAttention
from biformer.analysis import count_flops, reference_routing, sdpa_flop_jit
from biformer.analysis.complexity import (
    bra_flops,
    complexity_report,
    dividing_region_counts,
    full_attention_flops,
    optimal_regions_per_side,
    window_attention_flops,
)
from biformer.analysis.flops import _fvcore
from biformer.cli import main

# the original repository's fvcore totals at 224x224 (flop_count_table), and the paper's STL figure
ORIGINAL_GFLOPS = {"biformer_tiny": 2.228, "biformer_small": 4.487, "biformer_base": 9.795, "biformer_stl": 4.6}


def _plain_fvcore(model: nn.Module, x: torch.Tensor) -> int:
    """fvcore's defaults plus only the SDPA handle: what the paper-compatible count must equal."""
    analysis = _fvcore().FlopCountAnalysis(model, x)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("biformer_tiny").eval()


def test_flops_cli_reproduces_biformer_tiny(capsys: pytest.CaptureFixture) -> None:
    assert main(["flops", "biformer_tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == pytest.approx(13.1e6, rel=0.01)
    assert out["gflops"] == pytest.approx(ORIGINAL_GFLOPS["biformer_tiny"], rel=0.01)
    assert [p["name"] for p in out["parts"]] == ["stem", "stage 1", "stage 2", "stage 3", "stage 4", "head"]
    assert sum(p["flops"] for p in out["parts"]) == out["flops"]
    assert sum(p["params"] for p in out["parts"]) == out["params"]
    # routed stages gather keys/values; the global-attention stage does not
    assert all(p["gather_bytes"] > 0 for p in out["parts"][1:4]) and out["parts"][4]["gather_bytes"] == 0
    assert out["flops_complete"] > out["flops"]


@pytest.mark.parametrize("name", ["biformer_small", "biformer_base", "biformer_stl"])
def test_paper_flops_match_the_original(name: str) -> None:
    report = count_flops(timm.create_model(name), (224, 224))
    assert report.flops / 1e9 == pytest.approx(ORIGINAL_GFLOPS[name], rel=0.01)


def test_paper_count_is_plain_fvcore_on_the_reference_backend(tiny: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 96)
    with reference_routing(tiny):
        expected = _plain_fvcore(tiny, x)
    report = count_flops(tiny, (64, 96))
    assert report.flops == expected
    assert report.flops_complete - report.flops == sum(report.extra_by_operator.values())
    assert {"softmax", "topk", "reduce", "elementwise"} <= set(report.extra_by_operator)
    assert report.uncounted_ops == {}


def test_reference_routing_restores_backends(tiny: nn.Module) -> None:
    layers = [m for m in tiny.modules() if isinstance(m, BiLevelRoutingAttention)]
    layers[0].backend = "sdpa"
    try:
        with pytest.raises(RuntimeError):
            with reference_routing(tiny):
                assert {m.backend for m in layers} == {"reference"}
                raise RuntimeError("inside")
        assert layers[0].backend == "sdpa" and {m.backend for m in layers[1:]} == {"auto"}
        tiny.train()
        count_flops(tiny, (64, 64))
        assert tiny.training and layers[0].backend == "sdpa"
    finally:
        layers[0].backend = "auto"
        tiny.eval()


def test_sdpa_is_counted_as_its_two_matmuls() -> None:
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)  # count_flops infers the input channels from a conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)  # (1, 1, 10, 8)
            q = x.expand(2, 4, 10, 8)
            k = x[..., :6, :].expand(2, 4, 6, 8)
            v = torch.cat([k, k], dim=-1)  # (2, 4, 6, 16)
            return F.scaled_dot_product_attention(q, k, v)

    report = count_flops(Attend(), (10, 8))
    assert report.by_operator["scaled_dot_product_attention"] == 2 * 4 * 10 * 6 * (8 + 16)
    assert report.extra_by_operator["softmax"] == 5 * 2 * 4 * 10 * 6


@pytest.mark.parametrize("size, s, topk", [(28, 7, 4), (14, 7, 16), (30, 7, 3)])
def test_layer_formula_matches_traced_layer(size: int, s: int, topk: int) -> None:
    """The complexity model counts what the reference kernel computes; fvcore sees the routing
    matmul as S^4 C multiply-adds where the paper's model says 2 S^4 C (padding included when S
    does not divide the map)."""
    c = 64
    layer = BiLevelRoutingAttention(c, num_heads=2, n_win=s, topk=topk, side_dwconv=5)
    report = count_flops(layer, (size, size), in_chans=c)
    model = bra_flops(size, size, c, topk, s)
    assert report.flops == model.projections + model.routing / 2 + model.attention + model.lce
    # gathers move keys and values of the routed regions (read + write, float32), and on a
    # padded grid also the routed regions' bool validity masks
    tokens = math.ceil(size / s) ** 2
    mask_bytes = 2 * s * s * topk * tokens if size % s else 0
    assert report.gather_bytes == 2 * 4 * s * s * topk * tokens * (c + c) + mask_bytes


def test_optimal_region_count_follows_the_papers_rule() -> None:
    assert optimal_regions_per_side(224, 224, 4) == pytest.approx(41.4, abs=0.05)
    s = optimal_regions_per_side(56, 56, 1)
    smooth = lambda v: 2 * v ** 4 * 64 + 2 * 1 * (56 * 56) ** 2 * 64 / v ** 2  # noqa: E731
    assert smooth(s) < smooth(s - 0.5) and smooth(s) < smooth(s + 0.5)
    assert dividing_region_counts(14, 14, topk=16) == [7, 14]


def test_baselines() -> None:
    full = full_attention_flops(56, 56, 64)
    window = window_attention_flops(56, 56, 64, window=7)
    assert full.attention == 2 * 3136 ** 2 * 64
    assert window.attention == 2 * 3136 * 49 * 64
    assert full.projections == window.projections == 4 * 3136 * 64 ** 2
    # a 7x7 window sees 49 tokens: the same attention cost as BRA with one routed 7x7 region
    assert bra_flops(56, 56, 64, topk=1, regions_per_side=8).attention == window.attention


def test_complexity_cli_json_and_plot(tmp_path, capsys: pytest.CaptureFixture) -> None:
    plot = tmp_path / "curve.png"
    assert main(["complexity", "--size", "224", "224", "--channels", "64", "--topk", "4", "--json",
                 "--output", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["optimal_S"] == pytest.approx(41.4, abs=0.05)
    at7 = out["breakdown_at_models_S"]
    assert at7["S"] == 7 and at7["projections"] == 4 * 224 * 224 * 64 ** 2
    assert at7["attention"] == pytest.approx(2 * 4 * (224 * 224) ** 2 * 64 / 49)
    assert at7["total"] == pytest.approx(at7["projections"] + at7["routing"] + at7["attention"] + at7["lce"])
    assert out["full_attention"]["total"] > at7["total"] > out["breakdown_at_optimal_S"]["total"]
    with Image.open(plot) as img:
        assert min(img.size) >= 400
        assert len(img.convert("RGB").getcolors(1 << 20)) > 50  # lines and text, not a blank canvas


def test_complexity_text_explains_the_models_choice(capsys: pytest.CaptureFixture, tmp_path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["complexity", "--size", "56", "56", "--channels", "64", "--topk", "1"]) == 0
    assert list(tmp_path.iterdir()) == []  # no --output: no plot written
    text = capsys.readouterr().out
    assert "optimal S" in text and "13.0" in text and "Why the released models use S = 7" in text


def test_cli_errors_are_clean(capsys: pytest.CaptureFixture) -> None:
    assert main(["flops", "resnet50"]) == 2  # a UserError: one line, exit 2
    assert "registered BiFormers" in capsys.readouterr().err
    assert main(["complexity", "--size", "8", "8", "--channels", "16", "--topk", "100"]) == 2
    assert "topk=100" in capsys.readouterr().err
    report = complexity_report(56, 56, 64, 4)
    assert report.best_dividing_S in dividing_region_counts(56, 56, 4)
