"""Capture what every Bi-Level Routing Attention layer routed to, without changing the model.

:class:`RoutingCapture` puts a forward hook on each :class:`~biformer.BiLevelRoutingAttention`.
The hook takes the layer's input, recomputes ``q`` and ``k`` with the layer's own ``qkv``
projection, and redoes the routing (:func:`biformer.ops.route`) and, when asked, the token
attention probabilities (:func:`biformer.ops.routed_attention_weights`), all under ``no_grad``.
The layer itself runs untouched and the hook returns nothing, so the model's outputs are
bit-identical with and without capture; the price is one extra q/k projection per layer.

    >>> with RoutingCapture(model) as capture:
    ...     logits = model(images)
    >>> layer = capture.layer(stage=3, block=-1)
    >>> layer.indices.shape   # (N, regions, topk), best first
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UserValueError
from ..layers import BiLevelRoutingAttention
from ..ops import RegionGrid, resolve_grid, route, routed_attention_weights
from ..ops.regions import Routing

__all__ = ["CapturedLayer", "RoutingCapture", "routed_layers", "stage_and_block"]

_BLOCK_NAME = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")


@dataclass
class CapturedLayer:
    """What one BRA layer did in the last forward pass.

    ``stage`` is 1-based (as in the paper), ``block`` 0-based within the stage; both are None for a
    layer outside a BiFormer. ``indices`` / ``scores``: ``(N, P, topk)`` routed regions, best first,
    and their routing logits. ``attention``: ``(N, P, heads, T, topk*T)`` token attention
    probabilities (keys ordered as the routed regions, row-major inside each), or None when not
    captured. ``map_size`` is the layer's ``(H, W)`` in tokens.
    """

    name: str
    stage: Optional[int]
    block: Optional[int]
    grid: RegionGrid
    indices: Tensor
    scores: Tensor
    attention: Optional[Tensor]
    map_size: Tuple[int, int]

    @property
    def routing(self) -> Routing:
        return Routing(self.indices, self.scores, self.grid)


def stage_and_block(name: str) -> Tuple[Optional[int], Optional[int]]:
    """``(stage, block)`` of a module named ``stages.i.blocks.j...``: stage 1-based, block 0-based."""
    m = _BLOCK_NAME.search(name + ".")
    return (int(m.group(1)) + 1, int(m.group(2))) if m else (None, None)


def routed_layers(model: nn.Module) -> Dict[str, BiLevelRoutingAttention]:
    """Every BRA layer of ``model`` by module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BiLevelRoutingAttention)}


class RoutingCapture:
    """Context manager that records routing (and optionally attention) of every BRA layer.

    Args:
        model: any module containing :class:`~biformer.BiLevelRoutingAttention` layers.
        attention: also capture token attention probabilities: True for every layer, False for
            none, or a list of module names (they can be large on big maps).
    """

    def __init__(self, model: nn.Module, attention: Union[bool, Sequence[str]] = True) -> None:
        self.model = model
        self._modules = routed_layers(model)
        if not self._modules:
            raise UserValueError(f"{type(model).__name__} has no BiLevelRoutingAttention layer to capture")
        if isinstance(attention, bool):
            self._attention_for = set(self._modules) if attention else set()
        else:
            unknown = sorted(set(attention) - set(self._modules))
            if unknown:
                raise UserValueError(f"got attention layers {unknown}, expected names among {list(self._modules)}")
            self._attention_for = set(attention)
        self.layers: Dict[str, CapturedLayer] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "RoutingCapture":
        self.layers = {}
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        stage, block = stage_and_block(name)
        with_attention = name in self._attention_for

        def hook(module: BiLevelRoutingAttention, args: Tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0]
            if module.layout == "NCHW":
                x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
            with torch.no_grad():
                q, k, _ = module.qkv(x).split([module.qk_dim, module.qk_dim, module.dim], dim=-1)
                height, width = q.shape[1:3]
                grid = resolve_grid(height, width, n_win=module.n_win, region_size=module.region_size)
                routing = route(q, k, grid, module.topk, module.scale)
                attention = None
                if with_attention:
                    attention = routed_attention_weights(q, k, routing, num_heads=module.num_heads, scale=module.scale)
            self.layers[name] = CapturedLayer(
                name, stage, block, grid, routing.indices, routing.scores, attention, (height, width)
            )

        return hook

    def stages(self) -> List[int]:
        """1-based stages that have routed layers (of the captured model)."""
        return sorted({s for s, _ in map(stage_and_block, self._modules) if s is not None})

    def layer_name(self, stage: int, block: int = -1) -> str:
        """Module name of block ``block`` (negative counts from the end) of routed stage ``stage`` (1-based)."""
        names = [n for n in self._modules if stage_and_block(n)[0] == stage]
        if not names:
            raise UserValueError(
                f"got stage={stage}, which has no routed attention layer; routed stages are {self.stages()} "
                "(stages are numbered from 1; the last stage of BiFormer uses global attention, no routing)"
            )
        if not -len(names) <= block < len(names):
            raise UserValueError(f"got block={block} but stage {stage} has {len(names)} blocks (0..{len(names) - 1}, or -1 for the last)")
        return names[block]

    def layer(self, stage: int, block: int = -1) -> CapturedLayer:
        """The captured layer at ``stage`` (1-based) and ``block`` (negative counts from the end)."""
        name = self.layer_name(stage, block)
        if name not in self.layers:
            raise UserValueError(f"layer {name} has not run yet; call the model inside the `with RoutingCapture(...)` block")
        return self.layers[name]
