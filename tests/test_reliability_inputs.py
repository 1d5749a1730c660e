"""Issue 13 (part): bad inputs must fail clearly, non-finite values must propagate as in ``reference``,
images must decode at their real bit depth and predictions must not run away with memory."""
from __future__ import annotations

import pytest
import torch

from biformer.errors import UserError
from biformer.layers import BiLevelRoutingAttention, GlobalAttentionLCE
from biformer.models.biformer import BiFormer


# ------------------------------------------------------------------------------------------------
# item 7: layer construction


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: BiLevelRoutingAttention(16, num_heads=2, n_win=0, topk=1), "got n_win=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, n_win=4, region_size=2, topk=1), "give at most one"),
        (lambda: BiLevelRoutingAttention(0), "got dim=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=0), "got num_heads=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, qk_dim=0), "got qk_dim=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, topk=0), "got topk=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, side_dwconv=4), "got side_dwconv=4"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, side_dwconv=-3), "got side_dwconv=-3"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, qk_scale=0.0), "got qk_scale=0.0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, qk_scale=float("nan")), "got qk_scale=nan"),
        (lambda: GlobalAttentionLCE(0), "got dim=0"),
        (lambda: GlobalAttentionLCE(16, num_heads=0), "got num_heads=0"),
        (lambda: GlobalAttentionLCE(16, num_heads=2, side_dwconv=2), "got side_dwconv=2"),
        (lambda: BiFormer(depths=(1, 1, 1, 1), embed_dims=(32,) * 4, head_dim=16, topks=(1, 1, 1, None), n_win=0),
         "got n_win=0"),
    ],
    ids=["n_win0", "n_win_and_region_size", "dim0", "heads0", "qk_dim0", "topk0", "even_kernel", "negative_kernel",
         "scale0", "scale_nan", "global_dim0", "global_heads0", "global_even_kernel", "model_n_win0"],
)
def test_item07_layer_arguments_refused(build, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build()

