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
