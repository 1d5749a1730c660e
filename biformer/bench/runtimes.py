"""How a model is run in the benchmark: eager or ``torch.compile``, fp32 or autocast, PyTorch or ONNX Runtime.

A :class:`Setting` names one way of running; :func:`infer_call` / :func:`train_call` turn a model,
a setting and inputs into a zero-argument call for the harness, plus a ``prepare`` step that does
the one-off work (compiling, exporting) before anything is timed. ONNX and ONNX Runtime are
imported only when asked for, with an error naming the ``[export]`` extra when they are missing.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError

__all__ = ["Setting", "AMP_DTYPES", "require_onnx", "export_onnx", "ort_session", "relative_difference",
           "infer_call", "train_call"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EAGER, ONNX = "eager", "onnx"


@dataclass(frozen=True)
class Setting:
    """One way of running a model: runtime (eager PyTorch or ONNX Runtime), compiled or not, autocast dtype."""

    runtime: str = EAGER
    compile: bool = False
    amp: Optional[str] = None  # None: full precision; "bf16" or "fp16": torch.autocast

    def __post_init__(self) -> None:
        if self.runtime not in (EAGER, ONNX):
            raise UserError(f"got runtime={self.runtime!r}, expected {EAGER!r} or {ONNX!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise UserError(f"got amp={self.amp!r}, expected one of {sorted(AMP_DTYPES)}")
        if self.runtime == ONNX and (self.compile or self.amp):
            raise UserError("got --onnx with --compile or --amp for the same run; ONNX Runtime runs the fp32 export")

    @property
    def label(self) -> str:
        """'' for eager fp32 (the reference), else e.g. 'compiled', 'bf16', 'compiled+bf16', 'onnx'."""
        parts = [ONNX] if self.runtime == ONNX else []
        if self.compile:
            parts.append("compiled")
        if self.amp:
            parts.append(self.amp)
        return "+".join(parts)

    @property
    def trains(self) -> bool:
        return self.runtime == EAGER

    def to_dict(self) -> Dict[str, Any]:
        return {"runtime": self.runtime, "compile": self.compile, "amp": self.amp}


def check_amp(amp: Optional[str], device: torch.device) -> None:
    """fp16 autocast is a GPU feature; refuse it on the CPU with the alternative."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError("got --amp fp16 on the CPU; fp16 autocast needs a GPU, use --amp bf16 on the CPU")


def _autocast(setting: Setting, device: torch.device) -> ContextManager:
    if setting.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[setting.amp])


# --------------------------------------------------------------------------------------------
# ONNX Runtime


def require_onnx() -> Tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a one-line error naming the extra that provides them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx.export(dynamo=True) needs it
    except ImportError as e:
        raise UserError(f"--onnx needs onnx, onnxruntime and onnxscript ({e.name} is missing); "
                        "install them with: pip install 'biformer[export]'") from None
    return onnx, onnxruntime


def export_onnx(model: nn.Module, example: Tensor, path: str, max_batch: int = 1024) -> None:
    """Export ``model`` (eval mode) to ``path`` through ``torch.export``, with a dynamic batch axis."""
    from torch.export import Dim

    onnx, _ = require_onnx()
    was_training = model.training
    model.eval()
    try:
        # the batch dimension stays symbolic, so one file serves every batch size
        torch.onnx.export(model, (example,), path, dynamo=True, input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: Dim("batch", min=1, max=max_batch)},), verbose=False)
    finally:
        model.train(was_training)
    onnx.checker.check_model(path)


def ort_session(path: str, threads: int, device: torch.device = torch.device("cpu")) -> Any:
    """An ONNX Runtime session on ``path``: CPU EP with ``threads`` intra-op threads (CUDA EP on a GPU)."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(path, sess_options=options, providers=providers)


def relative_difference(got: Tensor, expected: Tensor) -> float:
    """``max |got - expected| / max |expected|``: the largest error relative to the output's scale."""
    got, expected = got.double(), expected.double()
    scale = expected.abs().max().item()
    return (got - expected).abs().max().item() / scale if scale else (got - expected).abs().max().item()


# --------------------------------------------------------------------------------------------
# calls for the harness


Prepare = Callable[[], Dict[str, Any]]


class _OnnxCache:
    """One export and one session per model (the batch axis is dynamic), kept in a temporary folder."""

    def __init__(self) -> None:
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self.sessions: Dict[int, Any] = {}

    def session(self, model: nn.Module, example: Tensor, threads: int, device: torch.device) -> Any:
        key = id(model)
        if key not in self.sessions:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="biformer-bench-onnx-")
            path = os.path.join(self._dir.name, f"model{len(self.sessions)}.onnx")
            export_onnx(model, example.cpu().float(), path)
            self.sessions[key] = ort_session(path, threads, device)
        return self.sessions[key]

    def close(self) -> None:
        self.sessions.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


ONNX_CACHE = _OnnxCache()


def _compiled(model: nn.Module, cache: Dict[int, nn.Module]) -> nn.Module:
    """One compiled wrapper per model (shared by its modes); static shapes, one graph per batch size."""
    if id(model) not in cache:
        cache[id(model)] = torch.compile(model, dynamic=False)
    return cache[id(model)]


COMPILED: Dict[int, nn.Module] = {}


def infer_call(model: nn.Module, x: Tensor, setting: Setting, threads: int) -> Tuple[Callable[[], Any], Prepare]:
    """An inference call of ``model`` on ``x`` under ``setting``, and its one-off preparation."""
    device = x.device
    if setting.runtime == ONNX:
        state: Dict[str, Any] = {}
        images = x.detach().cpu().float().numpy()

        def prepare() -> Dict[str, Any]:
            state["session"] = ONNX_CACHE.session(model, x, threads, device)
            (logits,) = state["session"].run(None, {"images": images})
            model.eval()
            with torch.inference_mode():
                expected = model(x).float().cpu()
            return {"max_rel_diff_vs_pytorch": relative_difference(torch.from_numpy(logits), expected)}

        def onnx_call() -> Any:
            return state["session"].run(None, {"images": images})
        return onnx_call, prepare

    runner = _compiled(model, COMPILED) if setting.compile else model
    # torch.compile traces under no_grad; inference_mode tensors would force a separate graph
    grad_off = torch.no_grad if setting.compile else torch.inference_mode

    def call() -> Any:
        model.eval()
        with grad_off(), _autocast(setting, device):
            return runner(x)

    def prepare() -> Dict[str, Any]:
        if setting.compile:
            call()  # compiles outside the timed and profiled calls
        return {}
    return call, prepare


def train_call(model: nn.Module, x: Tensor, labels: Tensor, setting: Setting) -> Tuple[Callable[[], Any], Prepare]:
    """One AdamW training step of ``model`` under ``setting`` (fp16 with a GradScaler), and its preparation."""
    if not setting.trains:
        raise UserError(f"got training under runtime={setting.runtime!r}; ONNX Runtime runs inference only")
    device = x.device
    runner = _compiled(model, COMPILED) if setting.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=setting.amp == "fp16" and device.type == "cuda")

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(setting, device):
            loss = F.cross_entropy(runner(x), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def prepare() -> Dict[str, Any]:
        if setting.compile:
            step()  # compiles forward and backward outside the timed and profiled calls
        return {}
    return step, prepare
