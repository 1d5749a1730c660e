"""Optimizer parameter groups and the learning-rate schedules the paper used for dense prediction."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["build_optimizer", "LRSchedule"]


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
