"""The step loop detection and segmentation train with (to be merged into the shared engine)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint import atomic_write
from ..errors import UserFileNotFoundError, UserValueError
from .optim import LRSchedule

__all__ = ["TrainLoop", "logged_evaluation"]


def logged_evaluation(
    evaluate: Callable[[], Dict[str, Any]], out_dir: Path, describe: Callable[[Dict[str, Any]], str],
    log: Callable[[str], None] = print,
) -> Callable[[int], Dict[str, Any]]:
    """``evaluate()`` as a :class:`TrainLoop` hook that also logs and appends to ``out_dir/metrics.jsonl``."""

    def hook(step: int) -> Dict[str, Any]:
        metrics = evaluate()
        log(f"eval at step {step}: {describe(metrics)}")
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        return metrics

    return hook


@dataclass
class TrainLoop:
    """Steps an optimizer over a stream of batches; logs, checkpoints, evaluates and resumes.

    ``compute_losses(batch)`` returns a dict of scalar losses (summed for the backward pass).
    ``save(step)`` writes the model; the loop itself writes the optimizer state and step next to it
    (``state_path``) so that :meth:`resume` can continue a stopped run exactly where it was.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    compute_losses: Callable[[Any], Dict[str, Tensor]]
    state_path: Optional[Path] = None
    save: Optional[Callable[[int], None]] = None
    evaluate: Optional[Callable[[int], Dict[str, float]]] = None
    log_every: int = 20
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    max_grad_norm: Optional[float] = None
    log: Callable[[str], None] = print
    step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def _set_lr(self) -> float:
        factor = self.schedule(self.step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor
        return self._base_lrs[0] * factor

    def resume(self) -> bool:
        """Load the optimizer state and step written by a previous run; False when there is none."""
        if self.state_path is None or not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self._base_lrs = list(state["base_lrs"])
        self.step = int(state["step"])
        return True

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "base_lrs": self._base_lrs}
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp))

    def _checkpoint(self) -> None:
        if self.save is not None:
            self.save(self.step)
            self._write_state()

    def run_from(self, loader: Iterable[Any], resume: bool) -> List[Dict[str, float]]:
        """Optionally resume (it is an error when there is nothing to resume), then :meth:`run` over
        ``loader``, restarting it as often as the schedule needs."""
        if resume:
            if not self.resume():
                raise UserFileNotFoundError(f"--resume: no optimizer state at {str(self.state_path)!r}")
            self.log(f"resumed at step {self.step}")

        def batches() -> Iterator[Any]:
            while True:
                yield from loader

        return self.run(batches())

    def run(self, batches: Iterator[Any], until: Optional[int] = None) -> List[Dict[str, float]]:
        """Train until step ``until`` (default: ``schedule.total_steps``), then save; evaluate when the
        schedule is complete. Returns one record per logged step."""
        total = self.schedule.total_steps
        stop = total if until is None else min(until, total)
        self.model.train()
        running: Dict[str, float] = {}
        count = 0
        start = time.perf_counter()
        while self.step < stop:
            lr = self._set_lr()
            losses = self.compute_losses(next(batches))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {self.step} ({ {k: v.item() for k, v in losses.items()} }); "
                    "lower the learning rate or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.step += 1
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            running["loss"] = running.get("loss", 0.0) + float(loss.detach())
            count += 1
            if self.step % self.log_every == 0 or self.step == stop:
                record = {k: v / count for k, v in running.items()}
                record.update(step=self.step, lr=lr, sec_per_step=(time.perf_counter() - start) / count)
                self.history.append(record)
                parts = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "lr", "sec_per_step"))
                self.log(f"step {self.step}/{total}  {parts}  lr {lr:.2e}  {record['sec_per_step']:.2f}s/step")
                running, count, start = {}, 0, time.perf_counter()
            if self.save_every and self.step % self.save_every == 0 and self.step < total:
                self._checkpoint()
            if self.evaluate is not None and self.eval_every and self.step % self.eval_every == 0 and self.step < total:
                self.evaluate(self.step)
                self.model.train()
        self._checkpoint()
        if self.evaluate is not None and self.step == total:
            self.evaluate(self.step)
        return self.history
