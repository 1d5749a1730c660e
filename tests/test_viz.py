"""Routing capture, the query / frequency figures, and `biformer visualize`."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import biformer  # noqa: F401  (registers the models)
from biformer import BiLevelRoutingAttention
from biformer.checkpoint import save_model
from biformer.cli import main
from biformer.ops import bi_level_routing_attention, gather_routed
from biformer.ops.regions import RegionGrid, from_regions, to_regions
from biformer.viz import (
    BUNDLED_IMAGES,
    CapturedLayer,
    RoutingCapture,
    UntrainedModelWarning,
    load_image,
    routing_statistics,
    visualize_queries,
    visualize_routing_frequency,
)
from biformer.viz.figures import input_multiple


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("biformer_tiny", num_classes=10).eval()


def _png_is_a_picture(path, min_side: int = 224) -> None:
    with Image.open(path) as img:
        assert min(img.size) >= min_side, img.size
        rgb = np.asarray(img.convert("RGB")).astype(float)
    assert rgb.std() > 20, "figure is (nearly) blank"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1000  # a photo and heatmaps, not flat colour


def test_capture_leaves_outputs_bit_identical(tiny: nn.Module) -> None:
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        plain = tiny(x)
        with RoutingCapture(tiny) as capture:
            captured = tiny(x)
        after = tiny(x)
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert len(capture.layers) == 2 + 2 + 8  # routed blocks of stages 1-3
    assert capture.stages() == [1, 2, 3]
    assert all(not m._forward_hooks for m in tiny.modules() if isinstance(m, BiLevelRoutingAttention))
    layer = capture.layer(stage=3, block=-1)
    assert layer.name == "stages.2.blocks.7.attn" and layer.block == 7
    assert layer.indices.shape == (2, 49, 16) and layer.attention.shape == (2, 49, 8, 1, 16)


def test_captured_routing_and_attention_are_what_the_layer_used() -> None:
    torch.manual_seed(1)
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=3, layout="NCHW", backend="reference").eval()
    x = torch.randn(1, 32, 18, 14)  # does not divide into 4x4 regions: padded
    with RoutingCapture(layer) as capture, torch.no_grad():
        layer(x)
    got = capture.layers[""]
    q, k, v = layer.qkv(x.permute(0, 2, 3, 1)).split([32, 32, 32], dim=-1)
    with torch.no_grad():
        out, routing = bi_level_routing_attention(q, k, v, num_heads=2, topk=3, n_win=4, return_routing=True)
        # the captured probabilities times the gathered values rebuild the op's output
        vr = to_regions(v, routing.grid, 2)
        rebuilt = from_regions(got.attention @ gather_routed(vr, got.indices), routing.grid)
    assert torch.equal(got.indices, routing.indices) and torch.equal(got.scores, routing.scores)
    torch.testing.assert_close(rebuilt, out)
    assert got.grid.is_padded and got.map_size == (18, 14)


def test_stage_and_block_lookup_errors(tiny: nn.Module) -> None:
    capture = RoutingCapture(tiny)
    with pytest.raises(ValueError, match="global attention"):
        capture.layer_name(stage=4)
    with pytest.raises(ValueError, match="block=8 but stage 3 has 8 blocks"):
        capture.layer_name(stage=3, block=8)
    with pytest.raises(ValueError, match="no BiLevelRoutingAttention"):
        RoutingCapture(nn.Linear(2, 2))


def test_query_arrays(tiny: nn.Module) -> None:
    with pytest.warns(UntrainedModelWarning):
        result = visualize_queries(tiny, "astronaut", queries=[(256, 256), (10, 500)], stage=3, untrained=True)
    assert result.image.shape == (224, 224, 3)
    first = result.queries[0]
    assert first.token == (7, 7) and first.region == 3 * 7 + 3  # 14x14 map, 2x2-token regions
    assert result.queries[1].token == (13, 0)
    assert first.attention.shape == (8, 14, 14)
    assert np.isfinite(first.attention).sum(axis=(1, 2)).tolist() == [16 * 4] * 8  # routed tokens only
    np.testing.assert_allclose(np.nansum(first.attention, axis=(1, 2)), 1.0, rtol=1e-5)  # probabilities
    assert np.all(np.diff(first.scores) <= 0)  # best first
    assert "RANDOM WEIGHTS" in result.figure.texts[0].get_text()
    with pytest.raises(ValueError, match="outside the 512x512 image"):
        visualize_queries(tiny, "astronaut", queries=[(600, 10)])
    with pytest.raises(ValueError, match="head=9"):
        visualize_queries(tiny, "astronaut", head=9)


def test_input_keeps_every_routed_stage_unpadded(tiny: nn.Module) -> None:
    assert input_multiple(tiny) == 112  # lcm(4*7, 8*7, 16*7)
    result = visualize_queries(tiny, "coffee", stage=1, head="all")  # 400x600 photo -> 224x336
    assert result.image.shape[:2] == (224, 336)
    assert not result.grid.is_padded and (result.grid.region_h, result.grid.region_w) == (8, 12)
    assert len(result.figure.axes) == 3 * (1 + 2 + 2)  # routing + 2 heads (+ their colorbars) per query


def test_routing_statistics_extremes() -> None:
    grid = RegionGrid(4, 4, 2, 2, 2, 2)
    collapsed = CapturedLayer("x", 1, 0, grid, torch.zeros(1, 4, 1, dtype=torch.long), torch.zeros(1, 4, 1), None, (4, 4))
    stats = routing_statistics(collapsed)
    assert stats["entropy"] == 0 and stats["top_region_share"] == 1 and stats["self_routed"] == 0.25
    own = torch.arange(4).view(1, 4, 1)
    stats = routing_statistics(CapturedLayer("x", 1, 0, grid, own, torch.zeros(1, 4, 1), None, (4, 4)))
    assert stats["entropy"] == pytest.approx(1) and stats["self_routed"] == 1 and stats["mean_distance"] == 0


def test_frequency_counts_every_query_region(tiny: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained-model call warns about nothing
        result = visualize_routing_frequency(tiny, "chelsea")
    topk = {1: 1, 2: 4, 3: 16}
    for stage, freq in result.frequency.items():
        assert freq.shape == (7, 7) and freq.sum() == 49 * topk[stage]
        assert 0 <= result.stats[stage]["entropy"] <= 1


def test_visualize_cli_with_a_checkpoint(tiny: nn.Module, tmp_path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "tiny.safetensors"
    save_model(ckpt, tiny, "biformer_tiny", {"num_classes": 10})
    out = tmp_path / "out.png"
    assert main(["visualize", "astronaut", "--checkpoint", str(ckpt), "--output", str(out),
                 "--query", "256,120", "--query", "100,400", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "random" not in captured.err.lower() and report["untrained"] is False
    assert report["layer"] == "stages.2.blocks.7.attn" and len(report["queries"]) == 2
    assert len(report["queries"][0]["routed"]) == 16
    _png_is_a_picture(out)


def test_visualize_cli_random_init_warns_and_draws_frequencies(tmp_path, capsys: pytest.CaptureFixture) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(load_image("chelsea")).save(photo)
    out = tmp_path / "freq.png"
    assert main(["visualize", str(photo), "--all-queries", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err and "stage 3" in captured.out
    _png_is_a_picture(out)
    assert main(["visualize", "nope.jpg", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in BUNDLED_IMAGES), err
    assert main(["visualize", "astronaut", "--stage", "4", "--output", str(out)]) == 2
    assert "global attention" in capsys.readouterr().err


def test_load_image_forms(tmp_path) -> None:
    gray = np.linspace(0, 1, 20 * 30).reshape(20, 30)
    assert load_image(gray).shape == (20, 30, 3) and load_image(gray).dtype == np.uint8
    assert {load_image(name).shape for name in BUNDLED_IMAGES} == {(512, 512, 3), (400, 600, 3), (300, 451, 3)}
