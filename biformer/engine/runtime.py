"""Where a run executes: device, processes (torchrun/DDP) and mixed precision.

One process (CPU or one GPU) needs nothing. Under ``torchrun`` the environment names the rank and
world size; the process group uses NCCL on GPUs and gloo on CPUs. Multi-node runs are plain
torchrun rendezvous (``--nnodes``, ``--rdzv-backend c10d``, ``--rdzv-endpoint``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import UserError, UserValueError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:  # torch names every device type it knows: keep the line short
        raise UserValueError(f"got device={name!r}, expected cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserValueError(f"got device={name!r} but CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment, pick the device and join the process group when there is one."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    return Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank, owns_process_group=owns)


def shutdown(runtime: Runtime) -> None:
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor, runtime: Runtime) -> Tensor:
    """Sum over ranks (in place); a no-op in one process."""
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: Tensor, runtime: Runtime) -> Tensor:
    """Minimum over ranks (in place); a no-op in one process."""
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``mode`` on ``device`` (None: full precision)."""
    if mode == "none":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise UserValueError("got amp='fp16' on a CPU; fp16 autocast needs a GPU, use --amp bf16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def broadcast_object(value: Any) -> Any:
    """The main process's ``value`` on every rank (run names hold a timestamp)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


def on_main_first(runtime: Any, step: Callable[[], T]) -> Optional[T]:
    """Run ``step`` on the main process only; if it fails, every rank raises at once instead of
    waiting for rank 0 in a later collective (a refusal, a UserError, stays one on every rank)."""
    result: Optional[T] = None
    outcome: Optional[tuple] = None  # (is a user error, message) when step failed
    failure: Optional[BaseException] = None
    if runtime.is_main:
        try:
            result = step()
        except Exception as e:
            failure, outcome = e, (isinstance(e, UserError), f"{type(e).__name__}: {e}")
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if outcome is not None:
        is_user_error, message = outcome
        if is_user_error:
            raise UserError(message.split(": ", 1)[1])
        raise RuntimeError(f"the main process failed to prepare the run folder: {message}")
    return result
