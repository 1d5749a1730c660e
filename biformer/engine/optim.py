"""Optimizer parameter groups, the learning-rate schedules the paper used for dense prediction, and
the one interface the training engine steps any schedule through (:class:`Schedule`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Protocol, Tuple

import torch
import torch.nn as nn

__all__ = ["build_optimizer", "LRSchedule", "Schedule", "ScaledSchedule", "TimmSchedule"]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on norms and biases (every parameter with fewer than 2 dims)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor per step: a linear warmup, then ``step``, ``poly`` or ``cosine`` decay.

    As mmcv's schedules the paper used: during warmup the factor rises linearly from
    ``warmup_ratio`` to the decayed value. ``milestones`` (steps) and ``gamma`` are for ``step``;
    ``power`` for ``poly``; ``min_ratio`` is the floor of ``poly`` and ``cosine``.
    """

    policy: str
    total_steps: int
    warmup_steps: int = 0
    warmup_ratio: float = 1e-3
    milestones: Tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 1.0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in ("step", "poly", "cosine"):
            raise ValueError(f"got policy={self.policy!r}, expected 'step', 'poly' or 'cosine'")
        if self.total_steps < 1:
            raise ValueError(f"got total_steps={self.total_steps}, expected at least 1")

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        if self.policy == "step":
            factor = self.gamma ** sum(step >= m for m in self.milestones)
        elif self.policy == "poly":
            factor = (1 - progress) ** self.power * (1 - self.min_ratio) + self.min_ratio
        else:
            factor = self.min_ratio + (1 - self.min_ratio) * (1 + math.cos(math.pi * progress)) / 2
        if step < self.warmup_steps:
            factor *= 1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
        return factor


class Schedule(Protocol):
    """How the engine drives a learning-rate schedule: ``set_update(u)`` before update ``u`` sets the
    optimizer's learning rates for it; the state goes into ``state.pt``."""

    def set_update(self, update: int) -> None: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class ScaledSchedule:
    """``lr x schedule(update)`` on every parameter group (the dense tasks' default). Stateless: the
    learning rate is a function of the update alone."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, schedule: LRSchedule) -> None:
        self.optimizer, self.lr, self.schedule = optimizer, lr, schedule

    def set_update(self, update: int) -> None:
        lr = self.lr * self.schedule(update)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class TimmSchedule:
    """A timm scheduler made with ``step_on_epochs=False`` (it steps every update)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def set_update(self, update: int) -> None:
        # timm's step_update(n) sets the rate for the update that follows n finished ones
        self.scheduler.step_update(num_updates=update)

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
