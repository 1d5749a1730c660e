"""BiFormer models: exact parity with the original, sizes, and the timm model contract."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import group_parameters

import biformer  # noqa: F401  (registers the models)
from biformer import BiFormer, BiLevelRoutingAttention, checkpoint_filter_fn
from biformer.ops import available_backends

from .conftest import reference_file

VARIANTS = ["biformer_tiny", "biformer_small", "biformer_base", "biformer_stl"]
ORIGINAL_PARAMS = {
    "biformer_tiny": 13_142_760,
    "biformer_small": 25_536_232,
    "biformer_base": 56_804_968,
    "biformer_stl": 28_372_552,
}


@pytest.fixture(scope="module")
def parity():
    tensors = load_file(str(reference_file("parity_tiny.safetensors")))
    kwargs = json.loads(reference_file("parity_tiny.json").read_text())["official_constructor_kwargs"]
    model = BiFormer(
        depths=kwargs["depth"], embed_dims=kwargs["embed_dim"], qk_dims=kwargs["qk_dims"],
        mlp_ratios=kwargs["mlp_ratios"], head_dim=kwargs["head_dim"], n_win=kwargs["n_win"],
        topks=[t if t > 0 else None for t in kwargs["topks"]], side_dwconv=kwargs["side_dwconv"],
        cpe_kernel=kwargs["before_attn_dwconv"], num_classes=kwargs["num_classes"],
    )
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(checkpoint_filter_fn(state, model))
    return model.eval(), tensors


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "flex"] + [
    pytest.param("flex", marks=pytest.mark.slow)  # compiles flex for each stage shape
])
def test_parity_with_the_original_implementation(parity, backend: str) -> None:
    model, ref = parity
    for module in model.modules():
        if isinstance(module, BiLevelRoutingAttention):
            module.backend = backend
    with torch.no_grad():
        logits = model(ref["input"])
        stages = model.forward_intermediates(ref["input"], intermediates_only=True)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    for i, stage in enumerate(stages):
        torch.testing.assert_close(stage, ref[f"stage{i}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_equals_the_original(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == ORIGINAL_PARAMS[name]


@pytest.mark.parametrize("hw", [(224, 224), (200, 300)])
def test_create_model_classifies_a_batch(hw) -> None:
    model = timm.create_model("biformer_tiny").eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *hw))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_contract(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 96, 64)  # divisible by 32: STL's patch convs floor odd sizes, as the original's do
    dims = [info["num_chs"] for info in model.feature_info]
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, dims[-1], 3, 2)
        assert model.forward_head(features, pre_logits=True).shape == (2, dims[-1])
        logits = model.forward_head(features)
        torch.testing.assert_close(logits, model(x))
        final, stages = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert [s.shape[1] for s in stages] == dims
        assert [s.shape[-2:] for s in stages] == [(24, 16), (12, 8), (6, 4), (3, 2)]
        assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
        assert len(model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)) == 2

    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, dims[-1])

    groups = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    # timm's optimizer factory exempts no_weight_decay() and every 1-D parameter from weight decay;
    # BiFormer has no position tables or tokens, so exactly the norms and biases are exempt
    assert model.no_weight_decay() == set()
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    exempt = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    one_d = {name for name, p in model.named_parameters() if p.ndim <= 1}
    assert {name for name, p in model.named_parameters() if id(p) in exempt} == one_d
    assert any(".norm" in n for n in one_d) and any(n.endswith(".bias") for n in one_d)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,)])
def test_features_only(out_indices) -> None:
    model = timm.create_model("biformer_tiny", features_only=True, out_indices=out_indices).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in features] == [[64, 128, 256, 512][i] for i in out_indices]
    assert [f.shape[-1] for f in features] == [96 // (4 * 2 ** i) for i in out_indices]
    assert model.feature_info.channels() == [[64, 128, 256, 512][i] for i in out_indices]


def test_gradient_checkpointing_keeps_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=5, depths=(1, 1, 2, 1))
    x = torch.randn(2, 3, 64, 64)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl"])
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, depths=(1, 1, 1, 1))
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3]))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_drop_path_and_train_mode_run() -> None:
    model = timm.create_model("biformer_tiny", drop_path_rate=0.2, drop_rate=0.1, num_classes=3).train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.slow  # ~80 s on 2 cores; tests/test_compile.py covers batch sizes 2, 3, 5 by default
def test_compile_fullgraph_without_recompiling() -> None:
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # one graph serves every batch size: the model has no batch-dependent Python branch
    model = timm.create_model("biformer_tiny", num_classes=10).eval()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 112, 112)
            torch.testing.assert_close(compiled(x), model(x))
    assert len(graphs) == 1


def test_export_with_dynamic_batch() -> None:
    from torch.export import Dim, export

    model = timm.create_model("biformer_tiny", num_classes=10).eval()
    program = export(model, (torch.randn(2, 3, 112, 112),), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_with_dynamic_height_and_width() -> None:
    """Dynamic H, W in steps of 112 (every stage map a multiple of n_win=7, regions of 2+ tokens)."""
    from torch.export import Dim, export

    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1), num_classes=10).eval()
    h, w = Dim("h", min=2, max=16), Dim("w", min=2, max=16)
    program = export(model, (torch.randn(2, 3, 224, 336),),
                     dynamic_shapes={"x": {0: Dim("batch", min=2, max=64), 2: 112 * h, 3: 112 * w}})
    for shape in [(2, 3, 224, 224), (3, 3, 336, 448), (2, 3, 448, 224)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_model_rejects_bad_input() -> None:
    model = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1)).eval()
    for bad in (torch.randn(1, 4, 64, 64), torch.randn(3, 64, 64), torch.randn(1, 3, 0, 64)):
        with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\)"):
            model(bad)
