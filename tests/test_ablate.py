"""`biformer ablate`: the token mixers against dense-mask ground truths, the skeleton hook, and the runner."""
from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch
from torch import Tensor

import biformer  # noqa: F401  (registers the models)
from biformer import BiLevelRoutingAttention
from biformer.ablate import MIXERS, build_mixer
from biformer.ablate.mixers import (
    AxialAttention,
    DilatedAttention,
    RandomRouting,
    ShiftedWindowAttention,
    StaticRouting,
    WindowAttention,
    nearest_regions,
)
from biformer.ops.regions import RegionGrid

# ---- ground truth: attention over the whole map with an explicit (token, token) mask ----------


def masked_full_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float,
                          allowed: Callable[[int, int, int, int], bool]) -> Tensor:
    """Float64 softmax attention over the (N, H, W, C) map where query (y, x) sees key (i, j) iff
    ``allowed(y, x, i, j)``; written token by token from the definition."""
    n, h, w, _ = q.shape
    mask = torch.tensor([[allowed(y, x, i, j) for i in range(h) for j in range(w)]
                         for y in range(h) for x in range(w)])  # (HW, HW)
    qh, kh, vh = (t.double().reshape(n, h * w, heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = (qh * scale) @ kh.transpose(-1, -2)  # (N, heads, HW, HW)
    out = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ vh
    return out.transpose(1, 2).reshape(n, h, w, -1)


def qkv(h: int, w: int, dim: int = 8, n: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, w, dim, generator=gen, dtype=torch.float64) for _ in range(3))


# ---- every mixer ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_maps_shape_to_shape_is_differentiable_and_has_bra_parameters(name: str) -> None:
    torch.manual_seed(0)
    kwargs = dict(num_heads=2, topk=2, n_win=2, side_dwconv=3, qk_dim=12, layout="NCHW")
    mixer = build_mixer(name, 16, block=1, **kwargs)
    bra = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2, side_dwconv=3, qk_dim=12)
    shapes = {k: v.shape for k, v in mixer.state_dict().items()}
    assert shapes == {k: v.shape for k, v in bra.state_dict().items()}
    assert sum(p.numel() for p in mixer.parameters()) == sum(p.numel() for p in bra.parameters())
    x = torch.randn(2, 16, 7, 9, requires_grad=True)  # 7x9: the 2x2 grid pads
    y = mixer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert mixer.qkv.weight.grad.abs().sum() > 0  # the mixing depends on q and k, not only on v


# ---- window-type mixers against dense masks ---------------------------------------------------


@pytest.mark.parametrize("hw, n_win", [((8, 12), 2), ((7, 10), 3)])
def test_window_attention_is_full_attention_restricted_to_windows(hw, n_win) -> None:
    h, w = hw
    mixer = WindowAttention(8, num_heads=2, n_win=n_win, layout="NHWC").double()
    grid = RegionGrid.from_n_win(h, w, n_win)
    q, k, v = qkv(h, w)
    same_window = lambda y, x, i, j: (y // grid.region_h, x // grid.region_w) == (i // grid.region_h, j // grid.region_w)  # noqa: E731
    expected = masked_full_attention(q, k, v, 2, mixer.scale, same_window)
    torch.testing.assert_close(mixer.mix(q, k, v), expected)


def _swin_label(pos: int, size: int, window: int, shift: int) -> int:
    """Swin's slice label of a rolled-map coordinate: [0, size - window), [size - window, size - shift), rest."""
    return 0 if pos < size - window else (1 if pos < size - shift else 2)


@pytest.mark.parametrize("hw, n_win", [((8, 8), 2), ((12, 8), 3), ((7, 10), 2)])
def test_shifted_window_is_window_attention_on_the_rolled_map_with_the_swin_mask(hw, n_win) -> None:
    h, w = hw
    mixer = ShiftedWindowAttention(8, num_heads=2, n_win=n_win, layout="NHWC").double()
    grid = RegionGrid.from_n_win(h, w, n_win)
    sh, sw = grid.region_h // 2, grid.region_w // 2
    hp, wp = grid.padded_h, grid.padded_w

    def allowed(y: int, x: int, i: int, j: int) -> bool:
        # positions on the padded map rolled by (-sh, -sw); same window and same Swin label
        ry, rx, ri, rj = (y - sh) % hp, (x - sw) % wp, (i - sh) % hp, (j - sw) % wp
        same_window = (ry // grid.region_h, rx // grid.region_w) == (ri // grid.region_h, rj // grid.region_w)
        same_label = (_swin_label(ry, hp, grid.region_h, sh), _swin_label(rx, wp, grid.region_w, sw)) == (
            _swin_label(ri, hp, grid.region_h, sh), _swin_label(rj, wp, grid.region_w, sw))
        return same_window and same_label

    q, k, v = qkv(h, w)
    expected = masked_full_attention(q, k, v, 2, mixer.scale, allowed)
    torch.testing.assert_close(mixer.mix(q, k, v), expected)
    # and the shift changes the result (the test would pass vacuously otherwise)
    unshifted = ShiftedWindowAttention(8, num_heads=2, n_win=n_win, layout="NHWC", shifted=False).double()
    assert not torch.allclose(unshifted.mix(q, k, v), expected)


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("hw, n_win", [((8, 8), 4), ((9, 7), 3)])
def test_dilated_attention_groups_tokens_a_dilation_apart(mode, hw, n_win) -> None:
    h, w = hw
    mixer = DilatedAttention(8, num_heads=2, n_win=n_win, layout="NHWC", mode=mode).double()
    grid = RegionGrid.from_n_win(h, w, n_win)
    if mode == "global":  # one token per region, at the same offset: group = position mod the region count
        group = lambda y, x: (y % grid.rows, x % grid.cols)  # noqa: E731
    else:  # blocks of 2x2 regions, tokens 2 apart inside a block
        dy, dx = min(2, grid.rows), min(2, grid.cols)
        group = lambda y, x: (y // (grid.region_h * dy), x // (grid.region_w * dx), y % dy, x % dx)  # noqa: E731
    q, k, v = qkv(h, w)
    expected = masked_full_attention(q, k, v, 2, mixer.scale, lambda y, x, i, j: group(y, x) == group(i, j))
    torch.testing.assert_close(mixer.mix(q, k, v), expected)


def test_axial_attention_is_full_attention_restricted_to_row_and_column() -> None:
    mixer = AxialAttention(8, num_heads=2, layout="NHWC").double()
    q, k, v = qkv(5, 7)
    expected = masked_full_attention(q, k, v, 2, mixer.scale, lambda y, x, i, j: y == i or x == j)
    torch.testing.assert_close(mixer.mix(q, k, v), expected)


# ---- routed mixers --------------------------------------------------------------------------


def test_random_routing_draws_topk_distinct_valid_regions_per_step_and_fixed_in_eval() -> None:
    mixer = RandomRouting(8, num_heads=2, n_win=4, topk=5, layout="NHWC")
    grid = RegionGrid.from_n_win(5, 5, 4)  # 2x2 regions over an 8x8 padded map: the last row/column is padding
    valid = grid.region_token_counts() > 0
    assert (~valid).any()
    q = torch.randn(3, 5, 5, 8)
    draws = []
    for _ in range(4):
        indices = mixer.routing(q, q, grid).indices  # (N, P, topk)
        assert indices.shape == (3, grid.num_regions, 5)
        assert all(len(set(row.tolist())) == 5 for row in indices.reshape(-1, 5))
        assert valid[indices].all()
        draws.append(indices)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # training: a new draw every forward
    torch.manual_seed(3)
    first = mixer.routing(q, q, grid).indices
    torch.manual_seed(3)
    assert torch.equal(mixer.routing(q, q, grid).indices, first)  # seeded by torch's generator
    mixer.eval()
    assert torch.equal(mixer.routing(q, q, grid).indices, mixer.routing(q, q, grid).indices)
    with pytest.raises(ValueError, match="topk=13 but the 5x5 map has only 9 regions"):
        RandomRouting(8, num_heads=2, n_win=4, topk=13, layout="NHWC")(torch.randn(1, 5, 5, 8))


@pytest.mark.parametrize("hw, n_win, topk", [((12, 12), 4, 5), ((10, 7), 3, 4), ((5, 5), 4, 9)])
def test_static_routing_picks_the_nearest_regions_by_centre_distance(hw, n_win, topk) -> None:
    grid = RegionGrid.from_n_win(*hw, n_win)
    picked = nearest_regions(grid, topk)
    counts = grid.region_token_counts()
    centre = [((r + 0.5) * grid.region_h, (c + 0.5) * grid.region_w) for r in range(grid.rows) for c in range(grid.cols)]
    for p in range(grid.num_regions):
        brute = sorted((math.dist(centre[p], centre[o]), o) for o in range(grid.num_regions) if counts[o] > 0)
        assert picked[p].tolist() == [o for _, o in brute[:topk]]
    mixer = StaticRouting(8, num_heads=2, n_win=n_win, topk=topk, layout="NHWC")
    q = torch.randn(2, *hw, 8)
    assert torch.equal(mixer.routing(q, q, grid).indices, picked.expand(2, -1, -1))


def test_static_routing_with_every_region_is_full_attention() -> None:
    mixer = StaticRouting(8, num_heads=2, n_win=3, topk=9, layout="NHWC", backend="reference").double()
    q, k, v = qkv(9, 6)
    expected = masked_full_attention(q, k, v, 2, mixer.scale, lambda *_: True)
    torch.testing.assert_close(mixer.mix(q, k, v), expected)


# ---- the skeleton hook --------------------------------------------------------------------------


def test_hook_leaves_biformer_stl_parameters_and_outputs_unchanged() -> None:
    torch.manual_seed(0)
    stl = timm.create_model("biformer_stl").eval()
    torch.manual_seed(0)
    hooked = timm.create_model("biformer_ablate", mixer="bra").eval()
    assert sum(p.numel() for p in stl.parameters()) == sum(p.numel() for p in hooked.parameters())
    assert 28.3e6 < sum(p.numel() for p in stl.parameters()) < 28.5e6  # the paper's 28.4M
    for (name, a), (_, b) in zip(stl.state_dict().items(), hooked.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), stl(x), rtol=0, atol=0)


@pytest.mark.parametrize("mixer", ["window", "random", "axial"])
def test_skeleton_swaps_only_the_mixer(mixer: str) -> None:
    bra = timm.create_model("biformer_ablate", mixer="bra", num_classes=10, depths=[1, 1, 2, 1],
                            embed_dims=[16, 32, 64, 128], head_dim=16, n_win=2, topks=[2, 2, 2, None])
    other = timm.create_model("biformer_ablate", mixer=mixer, num_classes=10, depths=[1, 1, 2, 1],
                              embed_dims=[16, 32, 64, 128], head_dim=16, n_win=2, topks=[2, 2, 2, None])
    assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in bra.state_dict().items()}
    attn = [type(b.attn).__name__ for stage in other.stages for b in stage.blocks]
    assert attn[-1] == "GlobalAttentionLCE" and attn.count("GlobalAttentionLCE") == 1  # the last stage is shared
    assert all(a != "BiLevelRoutingAttention" for a in attn)
    assert other(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---- the runner ---------------------------------------------------------------------------------


def _tiny_image_folder(root: Path) -> Path:
    """Two classes of 8x8 grey images (dark and light), four per class and split."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, label in itertools.product(("train", "val"), (0, 1)):
        folder = root / split / str(label)
        folder.mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(8, 8, generator=gen) * 100 + 150 * label).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").convert("RGB").save(folder / f"{i}.png")
    return root


def test_runner_trains_each_run_once_resumes_and_writes_the_table(tmp_path: Path) -> None:
    from biformer.ablate.runner import RESULT_FILE, TABLE_COLUMNS, AblationSettings, run_ablation
    from biformer.errors import UserError

    data = _tiny_image_folder(tmp_path / "data")
    config = tmp_path / "train.yaml"
    config.write_text("preset: digits\nbatch_size: 4\nnum_workers: 0\nlog_interval: 1\n")
    settings = AblationSettings(output=str(tmp_path / "abl"), mixers=["bra", "window"], topks=[2], seeds=1,
                                epochs=1, img_size=32, n_win=2, depths=[1, 1, 1, 1], embed_dims=[32, 32, 64, 64],
                                data=str(data), config=str(config), device="cpu", bench_batch=2, bench_steps=1)
    lines: list = []
    results = run_ablation(settings, log=lines.append)
    assert sorted(r["run"] for r in results) == ["bra-k2-s0", "window-s0"]
    assert [line.split(" (")[0] for line in lines if line.startswith("train ")] == ["train bra-k2-s0", "train window-s0"]
    runs = tmp_path / "abl" / "runs"
    mtimes = {p: p.stat().st_mtime_ns for p in runs.glob(f"*/{RESULT_FILE}")}
    weights = {p: p.stat().st_mtime_ns for p in runs.glob("*/last.safetensors")}
    assert len(mtimes) == 2 and len(weights) == 2

    # a rerun trains nothing: both runs are skipped and their files are untouched
    lines.clear()
    run_ablation(settings, log=lines.append)
    assert not [line for line in lines if line.startswith("train ")]
    assert sum(line.startswith("skip ") for line in lines) == 2
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert {p: p.stat().st_mtime_ns for p in weights} == weights

    # a run killed after training but before its result: resumed from its own checkpoint, not retrained
    (runs / "window-s0" / RESULT_FILE).unlink()
    lines.clear()
    again = {r["run"]: r for r in run_ablation(settings, log=lines.append)}
    assert again["window-s0"]["resumed"] is True and not again["bra-k2-s0"]["resumed"]
    assert (runs / "window-s0" / "metrics.csv").read_text().count("\n") == 2  # header + the one epoch

    # the table: the documented columns, one row per variant, and the plot
    with open(tmp_path / "abl" / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == TABLE_COLUMNS
    assert [(r["mixer"], r["topk"]) for r in rows] == [("bra", "2"), ("window", "")]
    for r in rows:
        assert float(r["params_M"]) == float(rows[0]["params_M"]) > 0  # only the mixer differs
        assert float(r["gflops"]) > 0 and float(r["img_per_s"]) > 0 and float(r["train_step_ms"]) > 0
        assert 0 <= float(r["top1_mean"]) <= 100 and r["seeds"] == "1"
    table_md = (tmp_path / "abl" / "table.md").read_text()
    assert "| mixer | topk | params (M) | GFLOPs | img/s | train step (ms) | top-1 (%) | seeds |" in table_md
    assert (tmp_path / "abl" / "accuracy_vs_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same output with other shared settings would mix incomparable runs
    settings.epochs = 2
    with pytest.raises(UserError, match="epochs=1"):
        run_ablation(settings, log=lines.append)


def test_plan_covers_every_variant_and_shards_split_it_exactly() -> None:
    from biformer.ablate.runner import parse_shard, plan_runs

    runs = plan_runs(["bra", "window", "static"], [1, 4], seeds=2)
    names = [r.name for r in runs]
    assert names[:5] == ["bra-k1-s0", "bra-k4-s0", "window-s0", "static-k1-s0", "static-k4-s0"]
    assert len(names) == len(set(names)) == 10
    shards = [runs[i::n] for i, n in (parse_shard(f"{i}/3") for i in range(3))]
    assert sorted(r.name for s in shards for r in s) == sorted(names)
    assert all(len(s) in (3, 4) for s in shards)


@pytest.mark.parametrize("argv, message", [
    (["--mixers", "bra,swin"], "got mixer 'swin', expected names from " + ", ".join(MIXERS)),
    (["--topk", "20"], "got topk=20 but stage 1 (16x16 tokens at img_size=64, n_win=4) has only 16 regions"),
    (["--shard", "2/2"], "got --shard '2/2', expected 0 <= I < N"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, argv, message) -> None:
    from biformer.cli import main

    assert main(["ablate", "--output", str(tmp_path / "abl"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"biformer ablate: error: {message}"
    assert not (tmp_path / "abl").exists()  # nothing written for a refused ablation


def test_under_torchrun_each_rank_takes_its_own_shard(tmp_path: Path, monkeypatch) -> None:
    import biformer.ablate.runner as runner
    from biformer.cli import main

    seen = []
    monkeypatch.setattr(runner, "run_ablation", lambda settings, shard: seen.append((settings.output, shard)))
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "3")
        assert main(["ablate", "--output", str(tmp_path / "a"), "--quick", "--threads", "1"]) == 0
        assert main(["ablate", "--output", str(tmp_path / "b"), "--quick", "--threads", "1", "--shard", "0/2"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [(str(tmp_path / "a"), (1, 3)), (str(tmp_path / "b"), (0, 2))]
