"""BRA in 3D: the op and layer on (N, D, H, W, C) maps against an independent dense-mask ground truth."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import biformer.ops.regions as regions
from biformer.errors import UserValueError
from biformer.layers import BiLevelRoutingAttention, BiLevelRoutingAttention3d
from biformer.ops import (
    BackendUnavailable,
    available_backends,
    bi_level_routing_attention,
    bi_level_routing_attention_3d,
)

CPU_BACKENDS = [b for b in available_backends() if b != "flex"]

# (N, D, H, W, n_win or None, region_size or None, topk, heads)
SHAPES = [
    (2, 4, 6, 6, 2, None, 3, 2),  # divisible, 2x2x2 regions
    (1, 3, 5, 7, None, (2, 2, 3), 4, 2),  # padded along every axis
    (1, 2, 3, 5, (1, 1, 4), None, 3, 1),  # W=5 in 4 regions of 2: the last region is only padding
    (1, 5, 4, 3, (3, 2, 1), None, 6, 2),  # topk = every region, uneven n_win
]


def _maps(n: int, d: int, h: int, w: int, c_qk: int, c_v: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(n, d, h, w, c_qk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(n, d, h, w, c_v, generator=g, dtype=dtype)
    return q, k, v


def _region_size(size: Tuple[int, int, int], n_win, region_size) -> Tuple[int, int, int]:
    if region_size is not None:
        return tuple(region_size) if not isinstance(region_size, int) else (region_size,) * 3
    n_win = tuple(n_win) if not isinstance(n_win, int) else (n_win,) * 3
    return tuple(math.ceil(s / c) for s, c in zip(size, n_win))


def naive_bra3d(q, k, v, region: Tuple[int, int, int], topk: int, num_heads: int,
                scale: Optional[float] = None) -> torch.Tensor:
    """Ground truth written from the definition: region id of every real token by integer division,
    region means over real tokens only, top-k by mean affinity (empty regions never), then dense
    attention masked to the routed regions. No padding anywhere."""
    n, d, h, w, c = q.shape
    scale = c ** -0.5 if scale is None else scale
    rd, rh, rw = region
    planes, rows, cols = math.ceil(d / rd), math.ceil(h / rh), math.ceil(w / rw)
    p = planes * rows * cols
    region_of = torch.empty(d * h * w, dtype=torch.long)
    for z in range(d):
        for y in range(h):
            for x in range(w):
                region_of[(z * h + y) * w + x] = ((z // rd) * rows + y // rh) * cols + x // rw
    onehot = F.one_hot(region_of, p).to(q.dtype)  # (DHW, P)
    counts = onehot.sum(0)
    with torch.no_grad():
        q_mean = torch.einsum("tp,ntc->npc", onehot, q.reshape(n, -1, c)) / counts.clamp(min=1)[:, None]
        k_mean = torch.einsum("tp,ntc->npc", onehot, k.reshape(n, -1, c)) / counts.clamp(min=1)[:, None]
        logits = (scale * q_mean @ k_mean.transpose(1, 2)).masked_fill(counts == 0, float("-inf"))
        routed = torch.zeros(n, p, p, dtype=torch.bool).scatter_(2, logits.topk(topk, dim=-1).indices, True)
        allowed = routed[:, region_of][:, :, region_of]  # (N, DHW, DHW)

    def heads(t):
        return t.reshape(n, d * h * w, num_heads, -1).transpose(1, 2)

    attn = (heads(q) * scale) @ heads(k).transpose(-1, -2)
    attn = attn.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return (attn @ heads(v)).transpose(1, 2).reshape(n, d, h, w, -1)


def _ids(s):
    return "x".join(map(str, s[:4]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_3d_backends_match_naive_ground_truth_forward_and_backward(backend: str, shape: Tuple) -> None:
    n, d, h, w, n_win, region_size, topk, heads = shape
    q, k, v = (t.double().requires_grad_() for t in _maps(n, d, h, w, 8, 6))
    q0, k0, v0 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = bi_level_routing_attention_3d(
        q, k, v, num_heads=heads, topk=topk, n_win=n_win, region_size=region_size, backend=backend
    )
    expected = naive_bra3d(q0, k0, v0, _region_size((d, h, w), n_win, region_size), topk, heads)
    assert out.shape == (n, d, h, w, 6)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    out.backward(weights)
    expected.backward(weights)
    for got, want in zip((q.grad, k.grad, v.grad), (q0.grad, k0.grad, v0.grad)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_3d_float64_gradcheck(backend: str) -> None:
    q, k, v = (t.requires_grad_() for t in _maps(1, 3, 3, 2, 4, 4, dtype=torch.float64, seed=2))

    def fn(q, k, v):  # 2x2x1 regions of 2x2x2 tokens: padded along D and H
        return bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=2, region_size=2, backend=backend)

    # fast mode (random projections of the Jacobian) keeps this under a few seconds on a loaded machine
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_3d_output_does_not_depend_on_padding_values(backend: str, monkeypatch) -> None:
    q, k, v = _maps(2, 5, 7, 6, 8, 8)
    kwargs = dict(num_heads=2, topk=3, region_size=(2, 3, 4), backend=backend)
    clean = bi_level_routing_attention_3d(q, k, v, **kwargs)
    zero_pad = regions.pad_map

    def garbage_pad(x, grid):
        padded = zero_pad(x, grid).clone()
        real = torch.zeros_like(padded, dtype=torch.bool)
        real[:, : grid.depth, : grid.height, : grid.width] = True
        return torch.where(real, padded, torch.randn_like(padded) * 1e4 + 3e3)

    monkeypatch.setattr(regions, "pad_map", garbage_pad)
    dirty = bi_level_routing_attention_3d(q, k, v, **kwargs)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, atol=1e-6, rtol=1e-6)


def test_3d_padding_only_regions_are_never_routed_to() -> None:
    # D=3 in 4 planes of 1 token: plane 3 is only padding; topk=6 routes to all 6 real regions
    q, k, v = _maps(2, 3, 4, 4, 8, 8, seed=3)
    _, routing = bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=6, n_win=(4, 2, 1), return_routing=True)
    grid = routing.grid
    assert (grid.planes, grid.rows, grid.cols, grid.region_d) == (4, 2, 1, 1)
    empty = set(torch.nonzero(grid.region_token_counts() == 0).flatten().tolist())
    assert empty == {6, 7}  # the two regions of plane 3
    assert not (set(routing.indices.flatten().tolist()) & empty)


def test_3d_with_one_plane_equals_2d() -> None:
    q, k, v = _maps(2, 1, 9, 11, 8, 6, seed=4)
    for backend in CPU_BACKENDS:
        out3, r3 = bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=3, n_win=(1, 3, 4), backend=backend,
                                                 return_routing=True)
        out2, r2 = bi_level_routing_attention(q[:, 0], k[:, 0], v[:, 0], num_heads=2, topk=3, n_win=(3, 4),
                                              backend=backend, return_routing=True)
        torch.testing.assert_close(out3[:, 0], out2, atol=1e-6, rtol=1e-6)
        assert torch.equal(r3.indices, r2.indices)


def test_3d_layer_with_one_plane_equals_2d_layer() -> None:
    torch.manual_seed(0)
    layer3 = BiLevelRoutingAttention3d(16, num_heads=2, n_win=(1, 3, 3), topk=4, side_dwconv=3)
    layer2 = BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=4, side_dwconv=3)
    with torch.no_grad():
        layer2.qkv.load_state_dict(layer3.qkv.state_dict())
        layer2.proj.load_state_dict(layer3.proj.state_dict())
        layer2.lce.weight.copy_(layer3.lce.weight[:, :, 1])  # on one plane only the middle kernel slice sees data
        layer2.lce.bias.copy_(layer3.lce.bias)
    x = torch.randn(2, 16, 1, 10, 8)
    torch.testing.assert_close(layer3(x)[:, :, 0], layer2(x[:, :, 0]), atol=1e-5, rtol=1e-5)


def test_3d_layer_layouts_agree_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(1)
    layer = BiLevelRoutingAttention3d(8, num_heads=2, region_size=(2, 3, 3), topk=2)
    x = torch.randn(1, 8, 3, 5, 7, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    layer.layout = "NDHWC"
    torch.testing.assert_close(layer(x.permute(0, 2, 3, 4, 1)), out.permute(0, 2, 3, 4, 1))
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs, message", [
    (dict(topk=65), "got topk=65 but the map has only 64 regions"),
    (dict(n_win=(2, 2)), r"got n_win=\(2, 2\), expected a positive integer or three of them"),
    (dict(region_size=0), "got region_size=0"),
    (dict(n_win=2, region_size=2), "give at most one of them"),
    (dict(layout="NCHW"), "got layout='NCHW', expected one of"),
    (dict(side_dwconv=4), "got side_dwconv=4"),
])
def test_3d_layer_refuses_bad_settings_naming_the_value(kwargs, message) -> None:
    with pytest.raises(UserValueError, match=message):
        BiLevelRoutingAttention3d(16, num_heads=2, **kwargs)


def test_3d_op_refuses_bad_inputs_naming_the_value() -> None:
    q, k, v = _maps(1, 2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"got topk=9 but the map has only 8 regions \(2x2x2 regions for a 2x4x4 map\)"):
        bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=9, n_win=2)
    with pytest.raises(ValueError, match=r"expected q of shape \(N, D, H, W, C\), got a 4-D tensor"):
        bi_level_routing_attention_3d(q[:, 0], k[:, 0], v[:, 0], num_heads=2, topk=1, n_win=2)
    with pytest.raises(ValueError, match=r"got n_win=\(1, 2\), expected an int or 3 of ints"):
        bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=1, n_win=(1, 2))
    with pytest.raises(BackendUnavailable, match="cuda-magic"):
        bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=1, n_win=2, backend="cuda-magic")


@pytest.mark.skipif("flex" not in available_backends(), reason="needs FlexAttention")
@pytest.mark.slow
def test_3d_flex_inference_matches_reference() -> None:
    q, k, v = _maps(1, 3, 5, 6, 8, 8, seed=6)
    with torch.no_grad():
        want = bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=3, region_size=(2, 2, 4), backend="reference")
        got = bi_level_routing_attention_3d(q, k, v, num_heads=2, topk=3, region_size=(2, 2, 4), backend="flex")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _check_compiled_layer(backend: str) -> None:
    torch.manual_seed(2)
    layer = BiLevelRoutingAttention3d(8, num_heads=2, region_size=(2, 2, 2), topk=2, backend="sdpa")
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(1, 8, 3, 4, 3, requires_grad=True)  # padded along D and H
    x0 = x.detach().clone().requires_grad_()
    out = compiled(x)
    want = layer(x0)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, x0.grad, atol=1e-5, rtol=1e-5)


def test_3d_layer_traces_fullgraph_forward_and_backward() -> None:
    """Dynamo and AOT autograd take the whole layer as one graph (no break), and it computes the eager result."""
    _check_compiled_layer("aot_eager")


@pytest.mark.slow
def test_3d_layer_compiles_fullgraph_with_inductor() -> None:
    """The same through inductor (~2 min on the loaded 2-core machine)."""
    _check_compiled_layer("inductor")


def test_bench_window_attention_3d_attends_within_each_region_only() -> None:
    from biformer.bench.bra3d import window_attention_3d
    from biformer.ops.regions import RegionGrid

    q, k, v = _maps(2, 3, 5, 4, 8, 8, seed=7)
    grid = RegionGrid.nd_from_region_size((3, 5, 4), (2, 2, 3))  # padded along every axis
    out = window_attention_3d(grid, 2, 0.5)(q, k, v)
    # independent: dense attention with "same region" as the mask, region ids by integer division
    z, y, x = torch.meshgrid(torch.arange(3), torch.arange(5), torch.arange(4), indexing="ij")
    region_of = ((z // 2) * 3 + y // 2) * 2 + x // 3
    same = region_of.reshape(-1)[:, None] == region_of.reshape(-1)[None, :]  # (DHW, DHW)

    def heads(t):
        return t.reshape(2, 60, 2, 4).transpose(1, 2)

    attn = ((heads(q) * 0.5) @ heads(k).transpose(-1, -2)).masked_fill(~same, float("-inf")).softmax(-1)
    expected = (attn @ heads(v)).transpose(1, 2).reshape(2, 3, 5, 4, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
