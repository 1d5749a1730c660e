"""FX tracing: symbolic_trace, torchvision's feature extractor and timm's FX feature path."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import timm
import torch
import torch.nn as nn
from torch import Tensor
from torch.fx import symbolic_trace
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import biformer  # noqa: F401  (registers the models with timm)

VARIANTS = ("biformer_tiny", "biformer_small", "biformer_base", "biformer_stl")
SIZES = ((224, 224), (200, 300))  # 200x300 is divided by no stage's 7x7 region grid


def _run(model: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, weights: Tensor
         ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Output, input gradient and parameter gradients of ``(fn(x) * weights).sum()``."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {k: p.grad.clone() for k, p in model.named_parameters()}


def _assert_trace_parity(model: nn.Module, size: Tuple[int, int]) -> None:
    traced = symbolic_trace(model)
    x = torch.randn(1, 3, *size)
    weights = torch.randn(1, model.num_classes)
    eager_out, eager_dx, eager_grads = _run(model, model, x, weights)
    traced_out, traced_dx, traced_grads = _run(model, traced, x, weights)
    # same ops in the same order: bit-identical, not just close
    assert torch.equal(eager_out, traced_out)
    assert torch.equal(eager_dx, traced_dx)
    assert eager_grads.keys() == traced_grads.keys()
    for key in eager_grads:
        assert torch.equal(eager_grads[key], traced_grads[key]), key


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_trace_matches_eager_forward_and_backward(variant: str, size: Tuple[int, int]) -> None:
    # one block per stage keeps the default run fast; every variant's stem, downsampling, widths,
    # heads and attention kinds are kept (the full depths are in the slow test below)
    torch.manual_seed(0)
    model = timm.create_model(variant, depths=(1, 1, 1, 1), num_classes=10).train()
    _assert_trace_parity(model, size)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_trace_matches_eager_full_depth(variant: str, size: Tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model(variant).train()
    _assert_trace_parity(model, size)


def test_traced_model_still_checks_its_input() -> None:
    traced = symbolic_trace(timm.create_model("biformer_tiny", depths=(1, 1, 1, 1), num_classes=10).eval())
    assert any(node.target.__name__ == "_check_image" for node in traced.graph.nodes if node.op == "call_function")
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\)"):
        traced(torch.randn(1, 4, 64, 64))


def test_feature_extractor_returns_stage_outputs() -> None:
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1)).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == eval_nodes
    # the last node of each stage is its NHWC -> NCHW permute
    stage_nodes = [f"stages.{i}.permute_1" for i in range(4)]
    assert all(name in eval_nodes for name in stage_nodes)
    extractor = create_feature_extractor(model, return_nodes={name: f"s{i}" for i, name in enumerate(stage_nodes)})
    x = torch.randn(2, 3, 200, 300)
    with torch.no_grad():
        features = extractor(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert list(features) == ["s0", "s1", "s2", "s3"]
    for got, want in zip(features.values(), expected):
        assert torch.equal(got, want)
    # module names work as well (the module's last node)
    by_module = create_feature_extractor(model, return_nodes=["stages.2"])
    with torch.no_grad():
        assert torch.equal(by_module(x)["stages.2"], expected[2])


def test_timm_fx_features_only() -> None:
    torch.manual_seed(0)
    kwargs = dict(depths=(1, 1, 1, 1))
    reference = timm.create_model("biformer_tiny", **kwargs).eval()
    features = timm.create_model("biformer_tiny", features_only=True, feature_cls="fx", **kwargs).eval()
    assert isinstance(features, timm.models.FeatureGraphNet)
    # the FX feature net keeps the backbone up to the last stage, under "graph_module."
    features.load_state_dict({
        f"graph_module.{k}": v for k, v in reference.state_dict().items() if not k.startswith(("head.", "norm."))
    })
    x = torch.randn(1, 3, 200, 300)
    with torch.no_grad():
        got = features(x)
        want = reference.forward_intermediates(x, intermediates_only=True)
    assert [t.shape[1] for t in got] == features.feature_info.channels() == [64, 128, 256, 512]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
