"""The backend layout: one file per backend, ``can_run`` reasons, the routing rule written once."""
from __future__ import annotations

import pytest
import torch

import biformer.ops.backends as backends
from biformer.ops import BackendUnavailable, available_backends, bi_level_routing_attention, select_backend
from biformer.ops.backends.flex import flex_attention
from biformer.ops.regions import resolve_grid, route
from biformer.ops.routing_rule import dense_token_bias, dense_token_mask, evaluate_mask_mod, region_major_mask_mod


def _maps(n, h, w, c, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, w, c, generator=g).requires_grad_(requires_grad) for _ in range(3))


def _naive_allowed(routing) -> torch.Tensor:
    """(N, HW, HW) over row-major image tokens, from per-token region ids computed here."""
    grid = routing.grid
    ys, xs = torch.meshgrid(torch.arange(grid.height), torch.arange(grid.width), indexing="ij")
    region_of = ((ys // grid.region_h) * grid.cols + xs // grid.region_w).reshape(-1)
    n = routing.indices.shape[0]
    routed = torch.zeros(n, grid.num_regions, grid.num_regions, dtype=torch.bool)
    routed.scatter_(2, routing.indices, True)
    return routed[:, region_of][:, :, region_of]


@pytest.mark.parametrize("hw, n_win, topk", [((8, 8), 4, 3), ((7, 10), 3, 2), ((13, 9), 4, 5)])
def test_dense_and_region_major_masks_are_the_same_rule(hw, n_win, topk) -> None:
    q, k, _ = _maps(2, *hw, 8)
    grid = resolve_grid(*hw, n_win=n_win)
    routing = route(q, k, grid, topk, 8 ** -0.5)
    dense = dense_token_mask(routing)[:, 0]  # (N, HW, HW)
    assert torch.equal(dense, _naive_allowed(routing))
    # the backend's additive form: 0 exactly where allowed, -inf elsewhere
    bias = dense_token_bias(routing, torch.bfloat16)[:, 0]
    assert bias.dtype == torch.bfloat16
    assert torch.equal(bias == 0, dense) and torch.equal(bias == float("-inf"), ~dense)
    # the region-major evaluation, restricted to real tokens and put in image order, is the same mask
    length = grid.num_regions * grid.region_tokens
    region_major = evaluate_mask_mod(region_major_mask_mod(routing), 2, length, length, torch.device("cpu"))[:, 0]
    slot = torch.arange(grid.padded_h * grid.padded_w).view(grid.rows, grid.region_h, grid.cols, grid.region_w)
    slot = slot.permute(0, 2, 1, 3).reshape(-1)  # region-major position -> padded row-major position
    order = torch.empty_like(slot)
    order[slot] = torch.arange(length)  # padded row-major position -> region-major position
    real = order.view(grid.padded_h, grid.padded_w)[: grid.height, : grid.width].reshape(-1)
    assert torch.equal(region_major[:, real][:, :, real], dense)
    # padded keys are never allowed
    padded_keys = ~grid.token_valid().reshape(-1)
    assert not region_major[:, :, padded_keys].any()


def test_available_backends_answers_for_the_machine_and_for_inputs() -> None:
    assert set(available_backends()) >= {"reference", "sdpa", "dense"}
    q, k, v = _maps(1, 8, 8, 8, requires_grad=True)
    for_training = available_backends(q, k, v, num_heads=2, topk=2, n_win=4)
    assert "flex" not in for_training and {"reference", "sdpa", "dense"} <= set(for_training)
    if flex_attention is not None:
        with torch.no_grad():
            assert "flex" in available_backends(q, k, v, num_heads=2, topk=2, n_win=4)


def test_explicit_backend_refusal_is_its_can_run_reason(monkeypatch) -> None:
    refusing = backends.Backend("dense", backends.dense.dense_backend, lambda *a: "dense refuses: test reason", True)
    monkeypatch.setitem(backends.BACKENDS, "dense", refusing)
    q, k, v = _maps(1, 8, 8, 8)
    with pytest.raises(BackendUnavailable, match="^dense refuses: test reason$"):
        bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend="dense")
    assert "dense" not in available_backends()


def test_auto_never_picks_a_backend_that_cannot_run(monkeypatch) -> None:
    grid = resolve_grid(14, 14, n_win=7)
    assert select_backend(grid, 16) == "dense"  # 2x2-token regions, topk 16 of 49: dense is cheaper
    calls = []

    def spy_dense(*args):
        calls.append(1)
        return backends.dense.dense_backend(*args)

    refusing = backends.Backend("dense", spy_dense, lambda *a: "refused", True)
    monkeypatch.setitem(backends.BACKENDS, "dense", refusing)
    q, k, v = _maps(1, 14, 14, 8)
    out = bi_level_routing_attention(q, k, v, num_heads=2, topk=16, n_win=7)
    expected = bi_level_routing_attention(q, k, v, num_heads=2, topk=16, n_win=7, backend="reference")
    assert not calls
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw, topk, expected", [((56, 56), 1, "sdpa"), ((28, 28), 4, "sdpa"), ((14, 14), 16, "dense")])
def test_cost_model_choice_for_biformer_stages(hw, topk, expected) -> None:
    """BiFormer-S at 224^2: the choices the calibration (biformer.ops.calibrate) measured as faster."""
    assert select_backend(resolve_grid(*hw, n_win=7), topk) == expected
