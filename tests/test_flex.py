"""The FlexAttention backend: its BlockMask, and a guard for each known trap."""
from __future__ import annotations

import pytest
import torch

import biformer.ops.backends.flex as flex
from biformer.ops import BackendUnavailable, bi_level_routing_attention
from biformer.ops.regions import resolve_grid, route

pytestmark = pytest.mark.skipif(flex.flex_attention is None, reason="this torch has no FlexAttention")


@pytest.fixture(autouse=True)
def fresh_flex_state(monkeypatch):
    """Each test starts with no compiled function and no recorded failure."""
    monkeypatch.setattr(flex, "_compiled", None)
    monkeypatch.setattr(flex, "_broken_reason", None)


def _maps(n, h, w, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, w, c, generator=g) for _ in range(3))


def _routing(h: int, w: int, n_win: int, topk: int, n: int = 2):
    q, k, _ = _maps(n, h, w, 8)
    grid = resolve_grid(h, w, n_win=n_win)
    return route(q, k, grid, topk, 8 ** -0.5)


def _rule_mask(routing) -> torch.Tensor:
    """(N, P*T, P*T) over region-major tokens: routed region and real key."""
    grid = routing.grid
    n, p, _ = routing.indices.shape
    t = grid.region_tokens
    allowed = torch.zeros(n, p, p, dtype=torch.bool).scatter_(2, routing.indices, True)
    token_allowed = allowed[:, :, None, :, None].expand(n, p, t, p, t).reshape(n, p * t, p * t)
    return token_allowed & grid.token_valid().reshape(1, 1, p * t)


@pytest.mark.parametrize("hw, n_win, topk", [((8, 8), 4, 3), ((7, 10), 3, 2), ((14, 14), 7, 16)])
def test_block_mask_equals_the_dense_mask_of_the_same_rule(hw, n_win, topk) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    routing = _routing(*hw, n_win, topk)
    mask = flex.routing_block_mask(routing)
    grid = routing.grid
    n, length = routing.indices.shape[0], grid.num_regions * grid.region_tokens
    dense = create_mask(mask.mask_mod, n, 1, length, length, device="cpu")[:, 0]
    assert torch.equal(dense, _rule_mask(routing))
    # block level: the hand-built mask visits exactly the blocks that create_block_mask finds
    built = create_block_mask(mask.mask_mod, n, 1, length, length, device="cpu", BLOCK_SIZE=grid.region_tokens)
    assert torch.equal(mask.to_dense(), built.to_dense())


def test_eager_flex_with_our_mask_is_correct_although_it_ignores_block_indices() -> None:
    q, k, v = _maps(2, 10, 9, 8)
    kwargs = dict(num_heads=2, topk=3, n_win=3)
    expected = bi_level_routing_attention(q, k, v, backend="reference", **kwargs)
    _, routing = bi_level_routing_attention(q, k, v, return_routing=True, **kwargs)
    grid = routing.grid

    def region_major(x):
        from biformer.ops.regions import to_regions

        return to_regions(x, grid, 2).transpose(1, 2).reshape(2, 2, grid.num_regions * grid.region_tokens, 4)

    out = flex.flex_attention(region_major(q), region_major(k), region_major(v),
                              block_mask=flex.routing_block_mask(routing), scale=8 ** -0.5)
    from biformer.ops.regions import from_regions

    out = from_regions(out.view(2, 2, grid.num_regions, grid.region_tokens, 4).transpose(1, 2), grid)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_training_on_the_cpu_is_refused_with_the_reason() -> None:
    q, k, v = (t.requires_grad_() for t in _maps(1, 8, 8, 8))
    with pytest.raises(BackendUnavailable, match="no backward on the CPU"):
        bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend="flex")


def test_a_failed_compile_disables_flex_for_the_process(monkeypatch) -> None:
    def broken_compile(*args, **kwargs):
        raise RuntimeError("C++ compile error (simulated)")

    monkeypatch.setattr(flex, "_compiled", broken_compile)
    q, k, v = _maps(1, 8, 8, 8)
    with torch.no_grad():
        with pytest.raises(BackendUnavailable, match="failed to compile"):
            bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend="flex")
        monkeypatch.setattr(flex, "_compiled", flex.flex_attention)  # even a working function is not trusted now
        with pytest.raises(BackendUnavailable, match="disabled for this process"):
            bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend="flex")


@pytest.mark.slow
def test_recompile_limit_raises_instead_of_falling_back_to_eager(monkeypatch) -> None:
    monkeypatch.setattr(flex, "RECOMPILE_LIMIT", 1)
    with torch.no_grad():
        q, k, v = _maps(1, 8, 8, 8)
        expected = bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend="reference")
        got = bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend="flex")
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        q, k, v = _maps(1, 12, 12, 8)
        with pytest.raises(BackendUnavailable, match="limit of 1 compiled shapes"):
            bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend="flex")


@pytest.mark.slow
def test_compiled_flex_stays_correct_over_more_than_eight_shapes() -> None:
    """The 9th distinct shape is where dynamo's default limit used to fall back to wrong eager results."""
    shapes = [(8, 8, 4, 2), (8, 12, 4, 3), (12, 12, 4, 2), (16, 16, 4, 4), (7, 9, 3, 2),
              (10, 10, 5, 3), (6, 8, 2, 2), (16, 8, 4, 2), (9, 14, 3, 4), (14, 14, 7, 16)]
    with torch.no_grad():
        for i, (h, w, n_win, topk) in enumerate(shapes):
            q, k, v = _maps(2, h, w, 16, seed=i)
            kwargs = dict(num_heads=2, topk=topk, n_win=n_win)
            expected = bi_level_routing_attention(q, k, v, backend="reference", **kwargs)
            got = bi_level_routing_attention(q, k, v, backend="flex", **kwargs)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"shape #{i + 1} {(h, w, n_win)}")
