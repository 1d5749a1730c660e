"""BiFormer as a dense-prediction backbone (detection, segmentation).

:class:`BiFormerBackbone` follows the original's dense-prediction wrapper: the classifier head and
the final BatchNorm are dropped, and each output stage gets its own LayerNorm over channels. It
returns four NCHW maps at strides 4, 8, 16 and 32 for any input size (the routed attention pads
and masks maps that its region grid does not divide).

The region grid is a per-task setting, as in the paper: ``n_win=7`` for 224^2 classification,
``n_win=8`` for 512^2 segmentation and ``n_win=16`` for ~800x1333 detection. Weights are not tied to
``n_win``, so a classification checkpoint loads into any of them.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Union

import torch.nn as nn
from timm.layers import LayerNorm2d
from torch import Tensor

from .errors import UserValueError
from .models.biformer import MODEL_ARGS, BiFormer, CheckpointMismatchError

PathLike = Union[str, os.PathLike]

__all__ = ["BiFormerBackbone", "STRIDES"]

STRIDES = (4, 8, 16, 32)


class BiFormerBackbone(nn.Module):
    """BiFormer feature extractor: ``(N, 3, H, W)`` -> four maps ``(N, C_i, ceil(H/s), ceil(W/s))``, s = 4, 8, 16, 32.

    Args:
        model_name: a registered variant (``biformer_tiny``, ``biformer_small``, ``biformer_base``, ``biformer_stl``).
        n_win: regions per side of the routed attention (paper: 8 for 512^2 segmentation, 16 for detection).
        pretrained: a classification checkpoint to start from (ours or the original's format).
        out_indices: which stages to return (default all four).
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) while training.
        frozen_stages: -1 trains everything; 0 freezes the stem; k >= 1 freezes the stem and stages 0..k-1
            (with their output norms). Frozen parts stay in eval mode.
        drop_path_rate: stochastic depth of the blocks.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        **model_kwargs: any other :class:`biformer.BiFormer` argument (``depths``, ``embed_dims``, ``topks``,
            ``region_size``, ``bra_backend``, ...).

    Outputs carry the original's per-output ``LayerNorm2d`` (``extra_norms.{i}``); the classifier
    head and the final BatchNorm are not part of this module.
    """

    def __init__(
        self,
        model_name: str = "biformer_small",
        *,
        n_win: int = 7,
        pretrained: Optional[PathLike] = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        norm_eval: bool = False,
        frozen_stages: int = -1,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if model_name not in MODEL_ARGS:
            raise UserValueError(f"got model_name={model_name!r}, expected one of {sorted(MODEL_ARGS)}")
        out_indices = tuple(sorted(set(out_indices)))
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise UserValueError(f"got out_indices={out_indices}, expected a non-empty subset of (0, 1, 2, 3)")
        if not -1 <= frozen_stages <= 4:
            raise UserValueError(f"got frozen_stages={frozen_stages}, expected -1 (none) to 4 (all)")
        import timm

        model: BiFormer = timm.create_model(
            model_name, num_classes=0, n_win=n_win, drop_path_rate=drop_path_rate, **model_kwargs
        )
        if pretrained is not None:
            from .checkpoint import load_weights

            not_loaded = load_weights(model, pretrained, model_name, without_head=True)
            if not_loaded:  # a backbone needs every tensor: a partial load is a different network
                raise CheckpointMismatchError(f"{str(pretrained)!r} does not fit backbone {model_name}: "
                                              f"{not_loaded[:8]} not loaded")
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.model_name = model_name
        self.n_win = n_win
        self.stem = model.stem
        self.stages = model.stages
        self.out_indices = out_indices
        channels = [info["num_chs"] for info in model.feature_info]
        # index-aligned with the stages, as in the original (``extra_norms.{i}``); unused outputs get none
        self.extra_norms = nn.ModuleList(
            [LayerNorm2d(c) if i in out_indices else nn.Identity() for i, c in enumerate(channels)]
        )
        self.out_channels: List[int] = [channels[i] for i in out_indices]
        self.strides: List[int] = [STRIDES[i] for i in out_indices]
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self._freeze()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: List[nn.Module] = [self.stem]
        for i in range(self.frozen_stages):
            modules += [self.stages[i], self.extra_norms[i]]
        return modules

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "BiFormerBackbone":
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: Tensor) -> List[Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(x.shape)}")
        outs = []
        x = self.stem(x)  # (N, 3, H, W) -> (N, C0, H/4, W/4)
        for i, stage in enumerate(self.stages[: self.out_indices[-1] + 1]):
            x = stage(x)  # -> (N, C_i, H/2^(i+2), W/2^(i+2))
            if i in self.out_indices:
                outs.append(self.extra_norms[i](x))
        return outs

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, n_win={self.n_win}, out_indices={self.out_indices}, "
                f"norm_eval={self.norm_eval}, frozen_stages={self.frozen_stages}")
