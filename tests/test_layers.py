"""The drop-in BiLevelRoutingAttention layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from biformer import BiLevelRoutingAttention, GlobalAttentionLCE


@pytest.mark.parametrize("hw", [(28, 28), (13, 17), (3, 50), (1, 1)])
def test_nchw_in_nchw_out_at_any_size(hw) -> None:
    layer = BiLevelRoutingAttention(32, num_heads=4, n_win=7, topk=4)
    x = torch.randn(2, 32, *hw)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_nhwc_layout_matches_nchw() -> None:
    torch.manual_seed(0)
    nchw = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=3)
    nhwc = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=3, layout="NHWC")
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(2, 32, 11, 9)
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), nchw(x))


def test_drops_into_a_conv_network_and_trains() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), BiLevelRoutingAttention(16, 2, n_win=3, topk=2), nn.Conv2d(16, 1, 1)
    )
    x = torch.randn(4, 3, 19, 23)
    target = x.mean(1, keepdim=True).tanh()  # learnable, unlike noise
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_region_size_replaces_n_win() -> None:
    layer = BiLevelRoutingAttention(16, num_heads=2, topk=2, region_size=4)
    assert layer.n_win is None
    assert layer(torch.randn(1, 16, 10, 13)).shape == (1, 16, 10, 13)


def test_lce_is_a_depthwise_conv_on_v_added_before_the_output_projection() -> None:
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=1, layout="NHWC")
    without = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=1, side_dwconv=0, layout="NHWC")
    without.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("lce.")})
    x = torch.randn(1, 6, 6, 8)
    v = layer.qkv(x)[..., 16:]
    lce = layer.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    expected = without(x) + lce @ layer.proj.weight.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(1, 8, 14, 14), "got 8 input channels .* expected dim=16"),
        (torch.randn(16, 14, 14), "expected a 4-D NCHW tensor, got 3-D"),
        (torch.randn(1, 16, 0, 14), "empty spatial size"),
    ],
)
def test_bad_input_names_the_value(x, message) -> None:
    with pytest.raises(ValueError, match=message):
        BiLevelRoutingAttention(16, num_heads=2)(x)


def test_bad_construction_names_the_value() -> None:
    with pytest.raises(ValueError, match="got num_heads=3"):
        BiLevelRoutingAttention(16, num_heads=3)
    with pytest.raises(ValueError, match="got layout='CHW'"):
        BiLevelRoutingAttention(16, layout="CHW")
    with pytest.raises(ValueError, match="got topk=20 but the map has only 16 regions"):
        BiLevelRoutingAttention(16, num_heads=2, n_win=4, topk=20)(torch.randn(1, 16, 8, 8))


def test_global_attention_lce_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    layer = GlobalAttentionLCE(16, num_heads=4, layout="NHWC")
    x = torch.randn(2, 5, 6, 16)
    n, h, w, c = x.shape
    q, k, v = layer.qkv(x).view(n, h * w, 3, 4, 4).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-1, -2)) * 4 ** -0.5).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(n, h, w, c)
    out = out + layer.lce(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(layer(x), layer.proj(out), atol=1e-5, rtol=1e-5)
