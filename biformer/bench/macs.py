"""Multiply-add counts of whole models, from a pluggable source.

A source maps ``(model, (H, W))`` to the multiply-adds of one image, counted paper-style: the
routed attention's algorithm (explicit matmuls over the gathered tokens), whatever backend would
run it. Sources:

* ``"analysis"``: :func:`biformer.analysis.flops.count_flops` (fvcore, as the paper counted);
* ``"flop_counter"``: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convs, attention) / 2;
* ``"auto"``: ``"analysis"`` when it can be imported, else ``"flop_counter"``.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn as nn

from ..errors import UserValueError
from ..layers import BiLevelRoutingAttention

__all__ = ["MAC_SOURCES", "count_macs", "resolve_mac_source"]

MacCounter = Callable[[nn.Module, Tuple[int, int]], int]


@contextmanager
def _eval_reference_backend(model: nn.Module) -> Iterator[None]:
    """Eval mode and the reference BRA backend (the algorithm's own matmuls), restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    backends, was_training = [m.backend for m in layers], model.training
    try:
        model.eval()
        for m in layers:
            m.backend = "reference"
        yield
    finally:
        model.train(was_training)
        for m, backend in zip(layers, backends):
            m.backend = backend


def _analysis_macs(model: nn.Module, image_size: Tuple[int, int]) -> int:
    from ..analysis.flops import count_flops

    return int(count_flops(model, image_size).flops)  # fvcore's FLOP is one multiply-add


def _flop_counter_macs(model: nn.Module, image_size: Tuple[int, int]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.randn(1, 3, *image_size, device=param.device, dtype=param.dtype)
    with _eval_reference_backend(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2  # it counts a multiply-add as two FLOPs


MAC_SOURCES: Dict[str, MacCounter] = {"analysis": _analysis_macs, "flop_counter": _flop_counter_macs}


def resolve_mac_source(name: str) -> str:
    """The concrete source for ``name`` (``"auto"`` picks ``"analysis"`` when it is installed)."""
    if name == "auto":
        return "analysis" if importlib.util.find_spec("biformer.analysis.flops") is not None else "flop_counter"
    if name not in MAC_SOURCES:
        raise UserValueError(f"got MAC source {name!r}, expected 'auto' or one of {sorted(MAC_SOURCES)}")
    return name


def count_macs(model: nn.Module, image_size: Tuple[int, int], source: str = "auto") -> int:
    """Multiply-adds of ``model`` for one ``3 x H x W`` image, from ``source``."""
    return MAC_SOURCES[resolve_mac_source(source)](model, image_size)
