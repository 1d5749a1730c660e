"""The routing explorer: its embedded data, its self-containment, and the page in a real headless browser."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import biformer  # noqa: F401  (registers the models with timm)
from biformer.viz import RoutingCapture, load_image, visualize_queries
from biformer.viz.explore import ExplorerImage, build_explorer_data, render_html, write_explorer
from biformer.viz.figures import _prepare

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
SCREENSHOT_DIR_ENV = "BIFORMER_EXPLORER_SCREENSHOT_DIR"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("biformer_tiny", depths=(1, 1, 2, 1), num_classes=10).eval()


def _decode(text: str, dtype: type) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def test_embedded_routing_and_attention_match_the_model() -> None:
    model = _model()
    data = build_explorer_data(model, [ExplorerImage("coffee", "coffee")], name="tiny", weights="w.safetensors", size=112)
    _, x, _ = _prepare(model, load_image("coffee"), 112)
    with RoutingCapture(model) as capture, torch.no_grad():
        model(x)
    layers = data["images"][0]["layers"]
    assert [(l["stage"], l["block"]) for l in layers] == [(1, 0), (2, 0), (3, 0), (3, 1)]
    for entry in layers:
        captured = capture.layers[entry["name"]]
        p, topk = captured.indices.shape[1:]
        assert entry["topk"] == topk and entry["stride"] == 1  # all fits: every query token is stored
        indices = _decode(entry["indices"], np.uint16).reshape(p, topk)
        assert np.array_equal(indices, captured.indices[0].numpy())  # routing: exact
        assert sum(entry["frequency"]) == p * topk
        attention = captured.attention[0].numpy()  # (P, heads, T, topk*T)
        scale = _decode(entry["scale"], np.float32).reshape(attention.shape[:3])
        quantised = _decode(entry["attention"], np.uint8).reshape(attention.shape)
        restored = quantised.astype(np.float32) / 255 * scale[..., None]
        # 8-bit per row: off by at most half a step of that row's maximum
        assert np.all(np.abs(restored - attention) <= scale[..., None] / 255 * 0.5 + 1e-7)
        assert np.allclose(scale, attention.max(-1))


def test_attention_is_subsampled_to_the_budget() -> None:
    model = _model()
    data = build_explorer_data(model, [ExplorerImage("coffee", "coffee")], name="tiny", weights=None, size=224,
                               attention_mb=0.3)
    layers = data["images"][0]["layers"]
    first = layers[0]  # stage 1 of a 224x336 input: regions of 8x12 tokens
    assert first["region"] == [8, 12] and first["stride"] == 4 and first["kept"] == 2 * 3
    budget = 0.3 * 2 ** 20 / len(layers)
    for entry in layers:
        stored = len(base64.b64decode(entry["attention"]))
        assert stored <= budget
        assert len(base64.b64decode(entry["indices"])) == 2 * entry["rows"] * entry["cols"] * entry["topk"]
    assert data["untrained"] is True


def test_page_is_self_contained_and_small(tmp_path: Path) -> None:
    out = tmp_path / "explorer.html"
    size = write_explorer(_model(), [ExplorerImage("astronaut", "astronaut"), ExplorerImage("coffee", "coffee")],
                          str(out), name="biformer_tiny", weights=None)
    page = out.read_text(encoding="utf-8")
    assert size == out.stat().st_size < 8 * 2 ** 20
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert page.count("data:image/") == 2
    payload = re.search(r"const DATA = (\{.*?\});\n", page, re.S).group(1)
    assert json.loads(payload)["model"] == "biformer_tiny"


# ---- the page in a real browser ----------------------------------------------------------------


def _chromium() -> Optional[str]:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _browse(page: Path, fragment: str, profile: Path, screenshot: Optional[Path] = None) -> str:
    """Open ``page#fragment`` in headless Chromium; the DOM after the scripts ran (or "" for a screenshot)."""
    binary = _chromium()
    assert binary is not None
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1400,900"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    result = subprocess.run(args + [f"{page.as_uri()}#{fragment}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _shown(dom: str) -> Tuple[List[int], Dict[str, str]]:
    regions = re.search(r'id="routed-list" data-regions="([\d,]*)"', dom)
    info = re.search(r'<div id="query-info"([^>]*)>', dom)
    assert regions and info, dom[-3000:]
    return [int(r) for r in regions.group(1).split(",")], dict(re.findall(r'data-(\w+)="([^"]*)"', info.group(1)))


@pytest.mark.skipif(_chromium() is None, reason=f"no headless browser: none of {CHROMIUM_NAMES} is on PATH "
                    "(Debian: apt-get install -y chromium)")
def test_clicking_a_query_shows_its_routed_regions_in_a_browser(tmp_path: Path) -> None:
    model = _model()
    page = tmp_path / "explorer.html"
    write_explorer(model, [ExplorerImage("astronaut", "astronaut")], str(page), name="biformer_tiny", weights=None)
    original = load_image("astronaut")  # 512 x 512, run at 224 x 224
    to_original = original.shape[1] / 224

    def python_routing(x: float, y: float, stage: int) -> List[int]:
        view = visualize_queries(model, original, queries=[(x * to_original, y * to_original)], stage=stage).queries[0]
        return view.routed.tolist()

    # opened without a link: the centre is the query, at the last block of stage 3
    before, info = _shown(_browse(page, "", tmp_path / "profile"))
    assert (info["stage"], info["block"], info["x"], info["y"]) == ("3", "1", "112.00", "112.00")
    assert before == python_routing(112, 112, stage=3)

    # a click (dispatched as a real mouse event on the canvas) at the centre of a stage-3 token
    click = (8 + 16 * 2, 8 + 16 * 11)
    dom = _browse(page, f"stage=3&block=-1&x={click[0]}&y={click[1]}", tmp_path / "profile")
    after, info = _shown(dom)
    assert abs(float(info["x"]) - click[0]) < 1 and abs(float(info["y"]) - click[1]) < 1
    assert (info["row"], info["col"]) == ("11", "2")
    assert after == python_routing(*click, stage=3)
    assert after != before  # the overlay changed to the clicked query's regions
    assert re.search(r'<pre id="errors">\s*</pre>', dom) and 'data-ready="1"' in dom  # no script error

    shot = tmp_path / "explorer.png"
    _browse(page, f"x={click[0]}&y={click[1]}", tmp_path / "profile", screenshot=shot)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1400) and pixels.std() > 20  # drawn, not blank
    if os.environ.get(SCREENSHOT_DIR_ENV):  # keep it where asked (the test's tmp_path is removed eventually)
        shutil.copy(shot, Path(os.environ[SCREENSHOT_DIR_ENV]) / shot.name)
