"""The functional BRA op: semantics, padding, routing, backends, errors, compilation."""
from __future__ import annotations

from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import biformer.ops.regions as regions
from biformer.ops import (
    BackendUnavailable,
    RegionGrid,
    available_backends,
    bi_level_routing_attention,
    routed_attention_weights,
)

# backends that run forward and backward on the CPU; 'flex' has its own tests (test_flex.py)
CPU_BACKENDS = [b for b in available_backends() if b != "flex"]

# (N, H, W, n_win or None, region_size or None, topk, heads)
SHAPES = [
    (2, 14, 14, 7, None, 4, 2),  # divisible
    (1, 13, 17, 4, None, 3, 2),  # padded on both sides
    (2, 8, 8, 7, None, 5, 1),  # regions made only of padding (region 2x2, only 4x4 real)
    (1, 10, 6, None, (4, 3), 2, 2),  # region_size, non-square grid
    (1, 5, 9, (2, 3), None, 6, 2),  # non-square n_win, topk = every region
]


def _maps(n: int, h: int, w: int, c_qk: int, c_v: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(n, h, w, c_qk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(n, h, w, c_v, generator=g, dtype=dtype)
    return q, k, v


def naive_bra(q, k, v, grid: RegionGrid, topk: int, num_heads: int, scale: Optional[float] = None):
    """Independent ground truth: per-token region ids on the unpadded map, dense masked attention."""
    n, h, w, c = q.shape
    scale = c ** -0.5 if scale is None else scale
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region_of = ((ys // grid.region_h) * grid.cols + xs // grid.region_w).reshape(-1)  # (HW,)
    onehot = F.one_hot(region_of, grid.num_regions).to(q.dtype)  # (HW, P)
    counts = onehot.sum(0).clamp(min=1)
    q_mean = torch.einsum("tp,ntc->npc", onehot, q.reshape(n, -1, c)) / counts[:, None]
    k_mean = torch.einsum("tp,ntc->npc", onehot, k.reshape(n, -1, c)) / counts[:, None]
    logits = scale * q_mean @ k_mean.transpose(1, 2)
    logits = logits.masked_fill(onehot.sum(0) == 0, float("-inf"))
    routed = torch.zeros(n, grid.num_regions, grid.num_regions, dtype=torch.bool)
    routed.scatter_(2, logits.topk(topk, dim=-1).indices, True)
    allowed = routed[:, region_of][:, :, region_of]  # (N, HW, HW)

    def heads(x):
        return x.reshape(n, h * w, num_heads, -1).transpose(1, 2)

    attn = (heads(q) * scale) @ heads(k).transpose(-1, -2)
    attn = attn.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return (attn @ heads(v)).transpose(1, 2).reshape(n, h, w, -1)


def _grid(h: int, w: int, n_win, region_size) -> RegionGrid:
    return regions.resolve_grid(h, w, n_win=n_win, region_size=region_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_backends_match_naive_ground_truth(backend: str, shape: Tuple) -> None:
    n, h, w, n_win, region_size, topk, num_heads = shape
    q, k, v = _maps(n, h, w, 8, 6)
    out = bi_level_routing_attention(
        q, k, v, num_heads=num_heads, topk=topk, n_win=n_win, region_size=region_size, backend=backend
    )
    expected = naive_bra(q, k, v, _grid(h, w, n_win, region_size), topk, num_heads)
    assert out.shape == (n, h, w, 6)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s[:3])))
def test_backend_gradients_match_reference(backend: str, shape: Tuple) -> None:
    n, h, w, n_win, region_size, topk, num_heads = shape
    grads = {}
    for name in ("reference", backend):
        q, k, v = (t.requires_grad_() for t in _maps(n, h, w, 8, 6, seed=1))
        out = bi_level_routing_attention(q, k, v, num_heads=num_heads, topk=topk, n_win=n_win, backend=name)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads[name] = (q.grad, k.grad, v.grad)
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hw", [(4, 4), (5, 3)])
def test_float64_gradcheck(backend: str, hw: Tuple[int, int]) -> None:
    q, k, v = (t.requires_grad_() for t in _maps(1, *hw, 4, 4, dtype=torch.float64, seed=2))

    def fn(q, k, v):
        return bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=2, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_does_not_depend_on_padding_values(backend: str, monkeypatch) -> None:
    q, k, v = _maps(2, 13, 10, 8, 8)
    kwargs = dict(num_heads=2, topk=3, n_win=4, backend=backend)
    clean = bi_level_routing_attention(q, k, v, **kwargs)
    zero_pad = regions.pad_map

    def garbage_pad(x, grid):
        padded = zero_pad(x, grid).clone()
        garbage = torch.randn_like(padded) * 1e4 + 3e3
        real = torch.zeros_like(padded, dtype=torch.bool)
        real[:, : grid.height, : grid.width] = True
        return torch.where(real, padded, garbage)

    monkeypatch.setattr(regions, "pad_map", garbage_pad)
    dirty = bi_level_routing_attention(q, k, v, **kwargs)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, atol=1e-6, rtol=1e-6)


def test_routing_is_topk_of_region_mean_affinity_and_skips_padding() -> None:
    q, k, v = _maps(2, 8, 8, 8, 8)
    _, routing = bi_level_routing_attention(q, k, v, num_heads=1, topk=16, n_win=7, return_routing=True)
    grid = routing.grid
    assert (grid.rows, grid.region_h, grid.padded_h) == (7, 2, 14)
    assert routing.indices.shape == routing.scores.shape == (2, 49, 16)
    # 4x4 regions hold real tokens; topk=16 must pick exactly those, in descending score order
    real = {r * 7 + c for r in range(4) for c in range(4)}
    assert set(routing.indices.unique().tolist()) == real
    assert (routing.scores[..., :-1] >= routing.scores[..., 1:]).all()
    q_mean = q.view(2, 4, 2, 4, 2, 8).mean((2, 4)).reshape(2, 16, 8)
    k_mean = k.view(2, 4, 2, 4, 2, 8).mean((2, 4)).reshape(2, 16, 8)
    expected = (q_mean * 8 ** -0.5) @ k_mean.transpose(1, 2)  # (2, 16, 16) over real regions
    query_region = 1 * 7 + 2  # row 1, col 2 -> index 6 among the real 4x4
    got = routing.scores[:, query_region]
    torch.testing.assert_close(got, expected[:, 6].sort(dim=-1, descending=True).values)


def test_routing_carries_no_gradient() -> None:
    q, k, v = (t.requires_grad_() for t in _maps(1, 14, 14, 8, 8))
    out, routing = bi_level_routing_attention(q, k, v, num_heads=2, topk=4, n_win=7, return_routing=True)
    assert not routing.scores.requires_grad
    assert out.requires_grad


def test_routed_attention_weights_are_probabilities_with_zero_on_padding() -> None:
    q, k, v = _maps(1, 9, 9, 8, 8)
    out, routing = bi_level_routing_attention(q, k, v, num_heads=2, topk=3, n_win=2, return_routing=True)
    weights = routed_attention_weights(q, k, routing, num_heads=2)  # (N, P, heads, T, k*T)
    grid = routing.grid
    assert weights.shape == (1, 4, 2, grid.region_tokens, 3 * grid.region_tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    key_valid = grid.token_valid()[routing.indices].view(1, 4, 1, 1, -1)
    assert (weights.masked_select(~key_valid.expand_as(weights)) == 0).all()
    vr = regions.to_regions(v, grid, 2)
    from biformer.ops import gather_routed

    recomposed = regions.from_regions(weights @ gather_routed(vr, routing.indices), grid)
    torch.testing.assert_close(recomposed, out, atol=1e-5, rtol=1e-5)


def test_region_grid_from_n_win_and_region_size() -> None:
    g = RegionGrid.from_n_win(13, 17, 4)
    assert (g.rows, g.cols, g.region_h, g.region_w, g.padded_h, g.padded_w) == (4, 4, 4, 5, 16, 20)
    g = RegionGrid.from_region_size(13, 17, (4, 5))
    assert (g.rows, g.cols) == (4, 4) and g.is_padded
    assert g.region_token_counts().tolist()[-1] == 1 * 2  # last region: 1 real row x 2 real cols
    assert not RegionGrid.from_n_win(56, 56, 7).is_padded


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.randn(2, 14, 14)), "got a 3-D tensor"),
        (dict(k=torch.randn(1, 14, 12, 8)), "q and k must have the same shape"),
        (dict(v=torch.randn(1, 7, 14, 8)), "v must share q's"),
        (dict(topk=50), "got topk=50 but the map has only 49 regions"),
        (dict(topk=0), "got topk=0"),
        (dict(num_heads=3), "got num_heads=3"),
        (dict(q=torch.randn(1, 0, 14, 8), k=torch.randn(1, 0, 14, 8), v=torch.randn(1, 0, 14, 8)), "empty spatial size"),
        (dict(region_size=2), "give exactly one of them"),
        (dict(n_win=0), "got n_win=0"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(change, message) -> None:
    q, k, v = _maps(1, 14, 14, 8, 8)
    kwargs = dict(q=q, k=k, v=v, num_heads=2, topk=4, n_win=7)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        bi_level_routing_attention(**kwargs)


def test_unknown_backend_is_refused_with_the_choices() -> None:
    q, k, v = _maps(1, 14, 14, 8, 8)
    with pytest.raises(BackendUnavailable, match="got backend='cuda-magic'"):
        bi_level_routing_attention(q, k, v, num_heads=2, topk=4, n_win=7, backend="cuda-magic")


def test_compiles_fullgraph_without_recompiling() -> None:
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(q, k, v):
        return bi_level_routing_attention(q, k, v, num_heads=2, topk=3, n_win=4)

    # one graph for every batch size (13 x 10 is padded to the 4 x 4 grid inside the graph)
    compiled = torch.compile(fn, backend=counting_backend, fullgraph=True, dynamic=True)
    for batch in (2, 3, 5):
        q, k, v = _maps(batch, 13, 10, 8, 8, seed=batch)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    assert len(graphs) == 1


LOW_PRECISION_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
_NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
# flex on the CPU has no backward and is float32-tested in test_flex.py
LOW_PRECISION_CASES = [("cpu", torch.bfloat16, b) for b in CPU_BACKENDS] + [
    pytest.param("cuda", dtype, b, marks=_NEEDS_GPU)
    for dtype in (torch.bfloat16, torch.float16) for b in available_backends()
]


@pytest.mark.parametrize("device, dtype, backend", LOW_PRECISION_CASES)
def test_low_precision_backends_match_reference(device: str, dtype: torch.dtype, backend: str) -> None:
    """Same inputs and dtype for both, so both route identically (routing is shared code); only the
    attention arithmetic differs. Gradients too."""
    q, k, v = (t.to(device, dtype) for t in _maps(2, 13, 15, 16, 16, seed=5))
    kwargs = dict(num_heads=2, topk=3, n_win=4)
    tol = LOW_PRECISION_TOLERANCE[dtype]

    def run(name: str):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = bi_level_routing_attention(*inputs, backend=name, **kwargs)
        out.float().square().sum().backward()
        return out, [t.grad for t in inputs]

    want, want_grads = run("reference")
    got, got_grads = run(backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), atol=4 * tol, rtol=4 * tol)
