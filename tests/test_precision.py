"""Mixed precision: bf16 autocast on the CPU through every backend and the whole model.

Stated tolerances against the float32 reference (README, "Mixed precision"):
* one BRA op under bf16 autocast: outputs within 2e-2 absolute (inputs ~N(0, 1)), input gradients within 8e-2;
* the whole model (the original's parity weights and input): logits within 0.1 absolute (0.75 % of the
  logit range measured), cosine similarity > 0.9995, same top-1.
Routing is computed in float32 under autocast: it equals the routing of the same q/k values upcast.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from biformer import BiFormer, checkpoint_filter_fn
from biformer.ops import bi_level_routing_attention
from biformer.ops.backends import BACKENDS
from biformer.ops.regions import resolve_grid, route

from .conftest import reference_file

CPU_TRAINING_BACKENDS = [name for name in BACKENDS if name != "flex"]  # flex: no CPU backward


def _maps(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 13, 15, 16, generator=g) for _ in range(3))


def test_routing_under_autocast_is_float32_and_equals_the_upcast_routing() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 14, 14, 64, generator=g).bfloat16() for _ in range(2))
    grid = resolve_grid(14, 14, n_win=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = route(q, k, grid, 4, 0.125)
    upcast = route(q.float(), k.float(), grid, 4, 0.125)
    assert low.scores.dtype == torch.float32
    assert torch.equal(low.indices, upcast.indices)
    torch.testing.assert_close(low.scores, upcast.scores, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_TRAINING_BACKENDS)
def test_bf16_autocast_backend_matches_the_float32_reference(backend: str) -> None:
    q, k, v = _maps()
    kwargs = dict(num_heads=2, topk=3, n_win=4)

    def run(name: str, autocast: bool):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = bi_level_routing_attention(*inputs, backend=name, **kwargs)
        out.float().square().sum().backward()
        return out, [t.grad for t in inputs]

    want, want_grads = run("reference", autocast=False)
    got, got_grads = run(backend, autocast=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=8e-2, rtol=8e-2)


def test_bf16_autocast_model_matches_the_original_float32_logits() -> None:
    tensors = load_file(str(reference_file("parity_tiny.safetensors")))
    kw = json.loads(reference_file("parity_tiny.json").read_text())["official_constructor_kwargs"]
    model = BiFormer(
        depths=kw["depth"], embed_dims=kw["embed_dim"], qk_dims=kw["qk_dims"], mlp_ratios=kw["mlp_ratios"],
        head_dim=kw["head_dim"], n_win=kw["n_win"], topks=[t if t > 0 else None for t in kw["topks"]],
        side_dwconv=kw["side_dwconv"], cpe_kernel=kw["before_attn_dwconv"], num_classes=kw["num_classes"],
    )
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(checkpoint_filter_fn(state, model))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tensors["input"]).float()
    want = tensors["logits"]
    torch.testing.assert_close(logits, want, atol=0.1, rtol=0)
    assert torch.nn.functional.cosine_similarity(logits, want, dim=-1).min() > 0.9995
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_low_precision_kernel_matches_sdpa_in_float32(mask_kind: str) -> None:
    """bf16 on the CPU runs the explicit matmul + softmax kernel: it must agree with float32 SDPA
    (forward and input gradients) within bf16 tolerances, for every mask form the backends pass."""
    import torch.nn.functional as F

    from biformer.ops.kernel import attention, explicit_kernel_preferred

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 2, 16, 32, generator=g) for _ in range(3))
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(6, 1, 16, 16, generator=g) > 0.4
        allowed[..., 0] = True  # every query sees a key
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    assert explicit_kernel_preferred(q.bfloat16()) and not explicit_kernel_preferred(q)
    want_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*want_inputs, attn_mask=mask, scale=0.2)
    want.sum().backward()
    low_inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    low_mask = mask if mask is None or mask.dtype == torch.bool else mask.bfloat16()
    got = attention(*low_inputs, low_mask, 0.2)
    got.float().sum().backward()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    for low, ref in zip(low_inputs, want_inputs):
        torch.testing.assert_close(low.grad.float(), ref.grad, atol=8e-2, rtol=8e-2)
    # float32 is SDPA itself
    torch.testing.assert_close(attention(q, k, v, mask, 0.2), want.detach(), atol=0, rtol=0)
