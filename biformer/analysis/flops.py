"""Parameters and FLOPs of a model, per stage, counted two ways.

* **paper-compatible** (``flops``): fvcore's ``FlopCountAnalysis`` with its default operator
  handles, exactly as the original BiFormer repository printed its numbers (model in eval mode,
  one ``1 x 3 x H x W`` input, one multiply-add = one FLOP; softmax, top-k, gathers, means and
  elementwise ops are not counted). Two things are added so that our model counts like the
  original: a handle for ``aten::scaled_dot_product_attention`` (a fused op fvcore cannot see
  inside; counted as its two matmuls), and every :class:`~biformer.BiLevelRoutingAttention`
  is switched to the ``"reference"`` backend while tracing (explicit matmuls over the gathered
  tokens, like the original; ``"auto"`` may pick the dense-masked path, whose FLOPs are not the
  routed algorithm's).
* **complete** (``flops_complete``): the above plus what fvcore leaves out, with these
  conventions: elementwise ops (add, mul, GELU, ...) 1 per output element; softmax 5 per element
  (max, subtract, exp, sum, divide), including the softmax inside fused attention; mean and sum
  1 per input element; top-k 1 comparison per input element. Gathers cost no FLOPs but move
  memory: ``gather_bytes`` counts bytes read plus bytes written by ``index_select`` / ``gather`` /
  ``index`` (the routed key/value gathers of BRA).
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import UserValueError
from ..layers import BiLevelRoutingAttention
from .._extras import require

__all__ = [
    "FlopReport",
    "PartCount",
    "count_flops",
    "reference_routing",
    "sdpa_flop_jit",
]

# keys of the handles' counters: no prefix = paper-compatible FLOPs, "+" = FLOPs only the
# complete count has, "bytes:" = memory traffic (never FLOPs)
_EXTRA = "+"
_BYTES = "bytes:"

_ELEMENT_SIZE = {"Float": 4, "Half": 2, "BFloat16": 2, "Double": 8, "Long": 8, "Int": 4, "Bool": 1}


def _fvcore() -> Any:
    """Import fvcore.nn, hiding the FutureWarning its focal-loss module raises on import
    (it calls the deprecated ``torch.jit.script``); tracing itself is unaffected."""
    require("fvcore", extra="analysis")  # one clear error when the extra is absent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        import fvcore.nn as fvnn
    return fvnn


def _shape(value: Any) -> List[int]:
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(value)
    if shape is None:
        raise ValueError(f"fvcore could not infer the shape of a traced value {value!r}")
    return list(shape)


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention`` as the two matmuls it fuses: ``q @ k^T`` and
    ``attn @ v``, i.e. ``prod(q.shape[:-1]) * S * (d_qk + d_v)`` multiply-adds."""
    q, k, v = (_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _sdpa_softmax(inputs: List[Any], outputs: List[Any]) -> Counter:
    q, k = _shape(inputs[0]), _shape(inputs[1])
    return Counter({_EXTRA + "softmax": 5 * math.prod(q[:-1]) * k[-2]})


def _per_output_element(name: str, per_element: int = 1) -> Callable[[List[Any], List[Any]], Counter]:
    def handle(inputs: List[Any], outputs: List[Any]) -> Counter:
        return Counter({_EXTRA + name: per_element * math.prod(_shape(outputs[0]))})

    return handle


def _per_input_element(name: str) -> Callable[[List[Any], List[Any]], Counter]:
    def handle(inputs: List[Any], outputs: List[Any]) -> Counter:
        return Counter({_EXTRA + name: math.prod(_shape(inputs[0]))})

    return handle


def _gather_bytes(inputs: List[Any], outputs: List[Any]) -> Counter:
    out = outputs[0]
    size = _ELEMENT_SIZE.get(out.type().scalarType(), 4)
    return Counter({_BYTES + "gather": 2 * size * math.prod(_shape(out))})  # read + write


_ELEMENTWISE_OPS = (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "exp", "sqrt", "rsqrt",
    "pow", "gelu", "relu", "relu_", "silu", "sigmoid", "tanh", "erf", "where", "masked_fill",
)


# no arithmetic on activations: padding copies and the comparisons that build padding masks
# (fvcore already ignores their siblings eq/ge/gt/__and__/constant_pad_nd)
_ZERO_COST_OPS = ("pad", "lt", "le", "ne", "logical_and", "logical_or", "logical_not", "bitwise_and")


def _complete_handles() -> Dict[str, Any]:
    """Handles the complete count adds to fvcore's defaults (their keys never collide with them);
    a None handle tells fvcore to ignore the op."""
    handles: Dict[str, Any] = {f"aten::{op}": _per_output_element("elementwise") for op in _ELEMENTWISE_OPS}
    handles.update({f"aten::{op}": None for op in _ZERO_COST_OPS})
    handles["aten::softmax"] = _per_output_element("softmax", 5)
    handles["aten::_softmax"] = _per_output_element("softmax", 5)
    for op in ("mean", "sum"):
        handles[f"aten::{op}"] = _per_input_element("reduce")
    handles["aten::topk"] = _per_input_element("topk")
    for op in ("index_select", "gather", "index"):
        handles[f"aten::{op}"] = _gather_bytes
    return handles


def _sdpa_complete(inputs: List[Any], outputs: List[Any]) -> Counter:
    return Counter({"scaled_dot_product_attention": sdpa_flop_jit(inputs, outputs)}) + _sdpa_softmax(inputs, outputs)


@contextmanager
def reference_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily set every BiLevelRoutingAttention in ``model`` to the ``"reference"`` backend
    (explicit matmuls over the gathered tokens, as the original computes); restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    saved = [m.backend for m in layers]
    try:
        for m in layers:
            m.backend = "reference"
        yield model
    finally:
        for m, backend in zip(layers, saved):
            m.backend = backend


@dataclass
class PartCount:
    """One part of the model (stem, a stage, the head): parameters and counts for a batch of one."""

    name: str
    params: int
    flops: int
    flops_complete: int
    gather_bytes: int


@dataclass
class FlopReport:
    """Parameters and FLOPs of a model at one input size (batch of one).

    ``flops`` is the paper-compatible count (fvcore, one multiply-add = one FLOP);
    ``flops_complete`` adds softmax, top-k, reductions and elementwise ops; ``gather_bytes`` is
    the memory the gathers read and write. ``by_operator`` / ``extra_by_operator`` break the two
    counts down; ``uncounted_ops`` lists traced ops that neither count covers (shape ops aside).
    """

    model_name: str
    input_size: Tuple[int, int]
    params: int
    flops: int
    flops_complete: int
    gather_bytes: int
    parts: List[PartCount]
    by_operator: Dict[str, int] = field(default_factory=dict)
    extra_by_operator: Dict[str, int] = field(default_factory=dict)
    uncounted_ops: Dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["gflops"] = self.flops / 1e9
        d["gflops_complete"] = self.flops_complete / 1e9
        return d


def _part_of(module_name: str) -> str:
    """Part of a BiFormer that a module or parameter belongs to: ``stem``, ``stage 1``.., or ``head``."""
    parts = module_name.split(".")
    if parts[0] == "stem":
        return "stem"
    if parts[0] == "stages" and len(parts) > 1:
        return f"stage {int(parts[1]) + 1}"
    return "head"


def _input_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}: it has no Conv2d")


def count_flops(
    model: nn.Module,
    input_size: Sequence[int] = (224, 224),
    model_name: Optional[str] = None,
    in_chans: Optional[int] = None,
) -> FlopReport:
    """Count parameters and FLOPs of ``model`` for one ``in_chans x H x W`` input, per part.

    ``in_chans`` defaults to the input channels of the model's first Conv2d. The model is traced
    in eval mode with routed attention on the reference backend; its mode and backends are
    restored afterwards. See the module docstring for what each count includes.
    """
    if len(input_size) != 2 or any(int(s) < 1 for s in input_size):
        raise UserValueError(f"got input_size={tuple(input_size)!r}, expected (H, W) with positive sides")
    height, width = (int(s) for s in input_size)
    fvnn = _fvcore()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, in_chans or _input_channels(model), height, width, device=device)

    was_training = model.training
    model.eval()
    try:
        with reference_routing(model), torch.no_grad():
            analysis = fvnn.FlopCountAnalysis(model, x)
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_complete)
            analysis.set_op_handle(**_complete_handles())
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            per_module = analysis.by_module_and_operator()
            uncounted = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)

    def split(counter: Counter) -> Tuple[int, int, int]:
        paper = sum(v for k, v in counter.items() if not k.startswith((_EXTRA, _BYTES)))
        extra = sum(v for k, v in counter.items() if k.startswith(_EXTRA))
        moved = sum(v for k, v in counter.items() if k.startswith(_BYTES))
        return int(paper), int(paper + extra), int(moved)

    # parts: the stem, each stage, and the rest (final norm, pooling, classifier) as "head";
    # a model without stages is one part
    root = per_module[""]
    has_stages = isinstance(getattr(model, "stages", None), nn.Sequential)
    part_names = [n for n in per_module if n == "stem" or re.fullmatch(r"stages\.\d+", n)] if has_stages else []
    rest = "head" if has_stages else "model"
    counts = {_part_of(n): per_module[n] for n in part_names}
    counts[rest] = root - sum(counts.values(), Counter())
    params = dict.fromkeys(counts, 0)
    for name, p in model.named_parameters():
        part = _part_of(name) if has_stages else rest
        params[part if part in params else rest] += p.numel()
    parts = [PartCount(name, params[name], *split(counter)) for name, counter in counts.items()]

    paper, complete, moved = split(root)
    return FlopReport(
        model_name=model_name or type(model).__name__,
        input_size=(height, width),
        params=sum(p.numel() for p in model.parameters()),
        flops=paper,
        flops_complete=complete,
        gather_bytes=moved,
        parts=parts,
        by_operator={k: int(v) for k, v in sorted(root.items()) if not k.startswith((_EXTRA, _BYTES))},
        extra_by_operator={k[len(_EXTRA):]: int(v) for k, v in sorted(root.items()) if k.startswith(_EXTRA)},
        uncounted_ops=uncounted,
    )
