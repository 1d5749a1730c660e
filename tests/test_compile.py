"""torch.compile: compiled formulations agree with eager, and batch size changes do not recompile."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import biformer.ops.compiled as compiled_ops
from biformer import BiFormer, BiLevelRoutingAttention
from biformer.ops import available_backends, bi_level_routing_attention, select_backend
from biformer.ops.backends import BACKENDS
from biformer.ops.gather import routed_key_valid, routed_rows
from biformer.ops.regions import resolve_grid, route

AUTO_BACKENDS = [name for name, b in BACKENDS.items() if b.auto]


def _grads(module: torch.nn.Module, fn, x: torch.Tensor, dynamic_batch: bool):
    x = x.clone().requires_grad_()
    if dynamic_batch:
        torch._dynamo.mark_dynamic(x, 0)
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def _compare(module: torch.nn.Module, compiled, x: torch.Tensor, atol: float = 1e-5, dynamic_batch: bool = False) -> None:
    want = _grads(module, module, x, False)
    module.zero_grad(set_to_none=True)
    got = _grads(module, compiled, x, dynamic_batch)
    module.zero_grad(set_to_none=True)
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=atol, rtol=1e-4)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4)


# the dynamic-shape AOT check is left to the compiled-vs-eager tests below (it takes ~30 s here)
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_custom_ops_pass_opcheck() -> None:
    """Fake shapes and strides, autograd registration and dispatch of the compiled formulations."""
    g = torch.Generator().manual_seed(0)
    for (h, w), n_win in (((8, 8), 4), ((7, 10), 3)):  # divisible, padded
        q, k, v = (torch.randn(2, h, w, 8, generator=g, requires_grad=True) for _ in range(3))
        grid = resolve_grid(h, w, n_win=n_win)
        routing = route(q, k, grid, 3, 8 ** -0.5)
        mask = routed_key_valid(routing, q.device)
        if mask is not None:
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")).view(2 * grid.num_regions, 1, 1, -1)
        sizes = [grid.height, grid.width, grid.rows, grid.cols, grid.region_h, grid.region_w]
        opcheck(compiled_ops._routed_sdpa, (q, k, v, routed_rows(routing, 2), mask, sizes, 2, 0.3), test_utils=CHECKS)
    conv = torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)
    opcheck(compiled_ops._dwconv_nhwc, (torch.randn(2, 7, 10, 8, requires_grad=True), conv.weight, conv.bias, 2),
            test_utils=CHECKS)


@pytest.mark.slow  # ~40 s of inductor compilation on 2 cores
@pytest.mark.parametrize("backend", ["sdpa"])
def test_inductor_layer_matches_eager_forward_and_backward(backend: str) -> None:
    """Default inductor, fullgraph: a padded map, routed SDPA (the custom op) and the LCE conv op."""
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=2, layout="NHWC", backend=backend)
    compiled = torch.compile(layer, fullgraph=True)
    _compare(layer, compiled, torch.randn(2, 10, 8, 16))


@pytest.mark.slow
@pytest.mark.parametrize("backend", AUTO_BACKENDS)
@pytest.mark.parametrize("hw", [(14, 14), (13, 10)])
def test_inductor_layer_matches_eager_every_auto_backend(backend: str, hw) -> None:
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, num_heads=4, n_win=7, topk=4, layout="NHWC", backend=backend)
    _compare(layer, torch.compile(layer, fullgraph=True), torch.randn(2, *hw, 32))


def _count_graphs(backend: str = "aot_eager"):
    graphs = []
    inner = torch._dynamo.lookup_backend(backend)

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    return counting, graphs


@pytest.mark.parametrize("backend", AUTO_BACKENDS)
def test_no_recompile_across_batch_sizes(backend: str) -> None:
    """Batch 2, 3 and 5 through one compiled layer, forward and backward: one graph, same results."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(16, num_heads=2, n_win=3, topk=2, layout="NHWC", backend=backend)
    counting, graphs = _count_graphs()
    compiled = torch.compile(layer, backend=counting, fullgraph=True)
    for batch in (2, 3, 5):
        _compare(layer, compiled, torch.randn(batch, 9, 7, 16), dynamic_batch=True)
    assert len(graphs) == 1


def test_auto_picks_each_auto_backend_somewhere_in_a_model_compiled_once() -> None:
    """A small BiFormer, dynamic batch: auto picks sdpa and dense for its stages; one graph for 3 batch sizes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BiFormer(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 64), head_dim=16, topks=(1, 4, 16, None),
                     num_classes=5).eval()
    counting, graphs = _count_graphs()
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 3, 224, 224)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    assert len(graphs) == 1
    picked = {select_backend(resolve_grid(hw, hw, n_win=7), topk) for hw, topk in ((56, 1), (28, 4), (14, 16))}
    assert picked == set(AUTO_BACKENDS)


@pytest.mark.slow
def test_inductor_model_training_step_matches_eager() -> None:
    torch.manual_seed(0)
    model = BiFormer(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 64), head_dim=16, topks=(1, 4, 16, None),
                     num_classes=5)
    _compare(model, torch.compile(model, fullgraph=True), torch.randn(2, 3, 224, 224), atol=1e-4)


def test_available_backends_for_training_inputs_are_compilable() -> None:
    """Every backend that can train on the CPU also compiles fullgraph with gradients (aot_eager)."""
    q, k, v = (torch.randn(2, 8, 8, 8, requires_grad=True) for _ in range(3))
    for name in available_backends(q, k, v, num_heads=2, topk=2, n_win=4):
        def fn(q, k, v):
            return bi_level_routing_attention(q, k, v, num_heads=2, topk=2, n_win=4, backend=name)

        got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
        torch.testing.assert_close(got, fn(q, k, v), atol=1e-5, rtol=1e-5)
        got.sum().backward()
