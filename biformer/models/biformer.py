"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

One file for the family, read top to bottom: block, stage, model, checkpoint filter, configs,
registered variants (``biformer_tiny``, ``biformer_small``, ``biformer_base``, ``biformer_stl``).

Outputs are identical to the original implementation; original checkpoints load through
:func:`checkpoint_filter_fn`.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import Tensor

from ..errors import UserValueError
from ..layers import BiLevelRoutingAttention, GlobalAttentionLCE
from ..ops.compiled import depthwise_conv_nhwc

__all__ = ["BiFormer", "BiFormerBlock", "BiFormerStage", "checkpoint_filter_fn", "CheckpointMismatchError"]


class BiFormerBlock(nn.Module):
    """Optional conv position embedding, then pre-norm attention and MLP residuals. NHWC in and out."""

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        cpe_kernel: int = 3,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, cpe_kernel, padding=cpe_kernel // 2, groups=dim) if cpe_kernel > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (N, H, W, C)
        if self.cpe is not None:
            x = x + depthwise_conv_nhwc(x, self.cpe)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if torch.is_grad_enabled():
            return x + self.drop_path(self.mlp(self.norm2(x)))
        # inference: x is a buffer this block made, so the last residual can reuse it (no allocation)
        return x.add_(self.drop_path(self.mlp(self.norm2(x))))


def _check_image(x: Tensor, in_chans: int) -> Tensor:
    """Return ``x`` if it is a batch of images; an FX leaf (it branches on the shape)."""
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(
            f"expected images of shape (N, {in_chans}, H, W) with H, W >= 1, got {tuple(x.shape)}"
        )
    return x


torch.fx.wrap("_check_image")


def _conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int, norm_first: bool = False) -> nn.Sequential:
    padding = (kernel_size - 1) // 2 if kernel_size % 2 else 0
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding)
    if norm_first:
        return nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(in_chs), conv=conv))
    return nn.Sequential(OrderedDict(conv=conv, norm=nn.BatchNorm2d(out_chs)))


class BiFormerStage(nn.Module):
    """Downsample (NCHW), then blocks (NHWC). NCHW in and out."""

    def __init__(
        self,
        in_chs: int,
        dim: int,
        depth: int,
        *,
        downsample: Optional[str],
        topk: Optional[int],
        num_heads: int,
        qk_dim: int,
        n_win: Optional[int],
        region_size: Optional[int],
        mlp_ratio: float,
        drop_path: Sequence[float],
        side_dwconv: int,
        cpe_kernel: int,
        norm_eps: float,
        bra_backend: str,
        attn_factory: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if downsample is None:
            self.downsample: nn.Module = nn.Identity()
        elif downsample == "conv":  # conv3x3 stride 2, BN
            self.downsample = _conv_bn(in_chs, dim, 3, 2)
        elif downsample == "merge":  # BN, conv2x2 stride 2 (Swin-style patch merging)
            self.downsample = _conv_bn(in_chs, dim, 2, 2, norm_first=True)
        else:
            raise ValueError(f"got downsample={downsample!r}, expected None, 'conv' or 'merge'")
        self.grad_checkpointing = False

        def make_attn(block: int) -> nn.Module:
            if attn_factory is not None:  # the token-mixer hook of `biformer ablate`
                return attn_factory(
                    dim=dim, block=block, topk=topk, num_heads=num_heads, qk_dim=qk_dim, n_win=n_win,
                    region_size=region_size, side_dwconv=side_dwconv, backend=bra_backend,
                )
            if topk is None:
                return GlobalAttentionLCE(dim, num_heads=8, side_dwconv=side_dwconv)
            return BiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=None if region_size is not None else n_win, topk=topk, side_dwconv=side_dwconv,
                qk_dim=qk_dim, region_size=region_size, layout="NHWC", backend=bra_backend,
            )

        self.blocks = nn.Sequential(*[
            BiFormerBlock(dim, make_attn(i), mlp_ratio, drop_path[i], cpe_kernel, norm_eps) for i in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


def _stem(kind: str, in_chans: int, dim: int) -> nn.Sequential:
    if kind == "conv":  # two conv3x3 stride 2
        return nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),
            norm1=nn.BatchNorm2d(dim // 2),
            act=nn.GELU(),
            conv2=nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
            norm2=nn.BatchNorm2d(dim),
        ))
    if kind == "patch":  # conv4x4 stride 4
        return _conv_bn(in_chans, dim, 4, 4)
    raise ValueError(f"got stem={kind!r}, expected 'conv' or 'patch'")


def _per_stage(value: Any, name: str) -> Tuple[Any, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 4
    if len(values) != 4:
        raise ValueError(f"got {name}={value!r}, expected one value or 4 (one per stage)")
    return values


class BiFormer(nn.Module):
    """BiFormer classification model (timm model contract).

    Args:
        depths, embed_dims: blocks and channels per stage.
        qk_dims: query/key width per stage (default ``embed_dims``).
        head_dim: query/key width per head of the routed stages (heads = ``qk_dim // head_dim``).
        topks: routed regions per stage; ``None`` makes a stage use global attention.
        n_win: regions per side in routed stages (or ``region_size`` tokens per side instead).
        stem: ``"conv"`` (two overlapping conv3x3 s2, BiFormer-T/S/B) or ``"patch"`` (conv4x4 s4, STL).
        downsample: ``"conv"`` (conv3x3 s2 + BN) or ``"merge"`` (BN + conv2x2 s2, STL).
        cpe_kernel: kernel of the depthwise conv position embedding in each block; 0 disables it.
        bra_backend: backend of the routed attention, see :func:`biformer.ops.bi_level_routing_attention`.
        attn_factory: builds each block's token mixer instead of BRA / global attention, called with
            the block's settings as keywords (``dim, block, topk, num_heads, qk_dim, n_win,
            region_size, side_dwconv, backend``); ``None`` (default) builds the BiFormer model.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        qk_dims: Optional[Sequence[int]] = None,
        head_dim: int = 32,
        topks: Sequence[Optional[int]] = (1, 4, 16, None),
        n_win: int = 7,
        region_size: Optional[int] = None,
        mlp_ratios: Union[float, Sequence[float]] = 3.0,
        side_dwconv: int = 5,
        cpe_kernel: int = 3,
        stem: str = "conv",
        downsample: str = "conv",
        norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        bra_backend: str = "auto",
        attn_factory: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"got global_pool={global_pool!r}, expected 'avg' or ''")
        depths = _per_stage(depths, "depths")
        embed_dims = _per_stage(embed_dims, "embed_dims")
        qk_dims = _per_stage(qk_dims or embed_dims, "qk_dims")
        topks = _per_stage(topks, "topks")
        mlp_ratios = _per_stage(mlp_ratios, "mlp_ratios")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.stem = _stem(stem, in_chans, embed_dims[0])
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # as torch.linspace
        stages, self.feature_info = [], []
        in_chs = embed_dims[0]
        for i in range(4):
            start = sum(depths[:i])
            stages.append(BiFormerStage(
                in_chs, embed_dims[i], depths[i],
                downsample=None if i == 0 else downsample,
                topk=topks[i],
                num_heads=qk_dims[i] // head_dim,
                qk_dim=qk_dims[i],
                n_win=n_win,
                region_size=region_size,
                mlp_ratio=mlp_ratios[i],
                drop_path=dpr[start:start + depths[i]],
                side_dwconv=side_dwconv,
                cpe_kernel=cpe_kernel,
                norm_eps=norm_eps,
                bra_backend=bra_backend,
                attn_factory=attn_factory,
            ))
            in_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=in_chs, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_image(self, x: Tensor) -> Tensor:
        return _check_image(x, self.in_chans)

    # ---- timm model contract -----------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()  # no position tables or tokens; timm's optimizer factory already skips 1-D params

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"got global_pool={global_pool!r}, expected 'avg' or ''")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (NCHW, strides 4/8/16/32), and optionally the final features.

        ``norm`` applies the final BatchNorm to the last stage's output only (it is sized for it).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"got output_fmt={output_fmt!r}, expected 'NCHW'")
        self._check_image(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._check_image(x)  # kept in an FX graph as a call, so traced models still check
        x = self.stem(x)  # (N, 3, H, W) -> (N, C0, H/4, W/4)
        x = self.stages(x)  # -> (N, C3, H/32, W/32)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))  # (N, C, H, W) -> (N, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---- checkpoints -------------------------------------------------------------------------------


class CheckpointMismatchError(UserValueError):
    """A checkpoint does not fit the model; the message lists the offending keys and shapes."""


_CLASSIFIER_KEYS = ("head.weight", "head.bias")

# original name -> ours, applied in order to each key
_ORIGINAL_BLOCK_RULES = [
    (r"\.pos_embed\.", ".cpe."),
    (r"\.attn\.qkv\.qkv\.", ".attn.qkv."),
    (r"\.attn\.wo\.", ".attn.proj."),
    (r"\.attn\.lepe\.", ".attn.lce."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.[23]\.", ".mlp.fc2."),
]


def is_original_state_dict(state_dict: Dict[str, Any]) -> bool:
    return any(k.startswith("downsample_layers.") for k in state_dict)


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, Tensor]:
    """Accept a raw state_dict or one wrapped under ``"model"`` or ``"state_dict"``."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}


def _convert_original(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    swin_layout = any(re.match(r"stages\.\d+\.blocks\.", k) for k in state_dict)  # biformer_stl
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(r"downsample_layers\.(\d)\.(\d)\.(.*)", key)
        if m:
            stage, idx, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if stage == 0 and not swin_layout:
                new = "stem." + {0: "conv1", 1: "norm1", 3: "conv2", 4: "norm2"}.get(idx, f"?{idx}") + "." + rest
            elif stage == 0:
                new = "stem." + {0: "conv", 1: "norm"}.get(idx, f"?{idx}") + "." + rest
            else:
                names = {0: "norm", 1: "conv"} if swin_layout else {0: "conv", 1: "norm"}
                new = f"stages.{stage}.downsample." + names.get(idx, f"?{idx}") + "." + rest
        elif not swin_layout:
            new = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        for pattern, repl in _ORIGINAL_BLOCK_RULES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def _describe(items: List[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def validate_state_dict(state_dict: Dict[str, Tensor], model: nn.Module, ignore: Sequence[str] = ()) -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing, unexpected or mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in ignore}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if k not in ignore}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: checkpoint {given[k]} vs model {expected[k]}" for k in sorted(set(given) & set(expected))
             if given[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_describe(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {_describe(wrong)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems)
        )


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """Convert an original BiFormer checkpoint (or one of ours) to this model's names, and check it fits.

    Everything but the classifier must match exactly; the classifier is left to timm, which drops it
    when ``num_classes`` differs from the checkpoint's.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_original_state_dict(state_dict):
        state_dict = _convert_original(state_dict)
    validate_state_dict(state_dict, model, ignore=_CLASSIFIER_KEYS)
    return state_dict


# ---- configs and registered variants -----------------------------------------------------------


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",  # the original release links are dead; load a local file with pretrained_cfg_overlay
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(),
    "biformer_small.in1k": _cfg(),
    "biformer_base.in1k": _cfg(),
    "biformer_stl.in1k": _cfg(first_conv="stem.conv"),
})

MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "biformer_tiny": dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512)),
    "biformer_small": dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512)),
    "biformer_base": dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768)),
    "biformer_stl": dict(
        depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratios=4.0,
        stem="patch", downsample="merge", cpe_kernel=0,
    ),
}


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **{**MODEL_ARGS[variant], **kwargs},
    )


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T: 13.1M params, 2.2 GFLOPs, 81.4% ImageNet top-1."""
    return _create_biformer("biformer_tiny", pretrained, **kwargs)


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S: 25.5M params, 4.5 GFLOPs, 83.8% ImageNet top-1."""
    return _create_biformer("biformer_small", pretrained, **kwargs)


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B: 56.8M params, 9.8 GFLOPs, 84.3% ImageNet top-1."""
    return _create_biformer("biformer_base", pretrained, **kwargs)


@register_model
def biformer_stl(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-STL, the paper's Swin-Tiny-layout ablation: 28.4M params, 4.6 GFLOPs, 82.7% top-1."""
    return _create_biformer("biformer_stl", pretrained, **kwargs)
