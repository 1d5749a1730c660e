"""The training loop every task shares (classification, detection, segmentation): one process or
many (torchrun, DDP), gradient accumulation, AMP, an optional EMA of the weights, exact resume, the
run folder's logs. A task plugs in through :class:`Task`; its optional hooks choose the optimizer
and schedule, the training batches and how validation figures read, and default to what the dense
tasks use.

Files in the run folder ``cfg.output``:

- ``config.yaml``: the command's resolved options (``--resume RUN`` reads them back);
- ``last.safetensors`` / ``best.safetensors``: the task model (best: the highest ``primary`` metric
  of the model or its EMA, named by ``weights=model|ema`` in the metadata);
- ``state.pt``: model, EMA, optimizer, schedule, AMP scaler, epoch, step in the epoch, the epoch's
  running sums, metrics so far: plain tensors and builtins that load with ``weights_only=True``;
- ``metrics.csv`` (one row per epoch), ``steps.csv``, ``tb/``, ``curves.png``.

Every file is replaced atomically, so a run killed at any moment resumes from its last checkpoint.
Random draws are seeded from ``(seed, epoch, position)`` (data augmentation) and ``(seed, update,
slot)`` (the model's own draws: drop path, mixup, proposal sampling), where a slot is
``micro_step * world_size + rank``. So a resumed run continues exactly as the uninterrupted one,
and N processes with batch B compute what one process with batch B and N accumulation steps computes.
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import Dataset

from ..checkpoint import DiskFullError, atomic_write, describe_load_error, is_disk_full
from ..errors import UserError, UserValueError
from .logs import RunLog, plot_curves, show_progress
from .optim import LRSchedule, ScaledSchedule, Schedule, build_optimizer
from .runtime import Runtime, all_reduce_min, all_reduce_sum, autocast, barrier, resolve_amp

__all__ = ["Engine", "EngineConfig", "Task", "TrainingDiverged", "derived_seed", "log", "run_in_folder", "run_task",
           "seed_all", "write_run_config"]

STATE_FORMAT = "biformer-task-state"
STATE_VERSION = 2
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
CANDIDATE_LABELS = {"model": "model", "ema": "EMA"}  # the weights validated at an epoch's end


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the run stops and keeps its last good state."""


def log(message: str, runtime: Optional[Runtime] = None) -> None:
    """Print on the main process, without breaking progress bars."""
    if runtime is None or runtime.is_main:
        from .._extras import require

        require("tqdm", extra="train")  # one clear error when the extra is absent
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def derived_seed(*values: int) -> int:
    """A seed from a tuple of integers (stable across processes and Python runs)."""
    import numpy as np

    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (timm's transforms and Mixup draw from all three)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Task(Protocol):
    """What a task gives the engine.

    Optional hooks, looked up on the task; without one the engine does what the dense tasks need:

    - ``find_unused_parameters: bool``: some parameters get no gradient on some batches (a detector's
      box head on an image without objects); DDP then looks for them every update. Default False.
    - ``configure_optimization(model, steps_per_epoch, world_size) -> (optimizer, Schedule)``
      (:class:`~biformer.engine.optim.Schedule`: ``set_update(u)`` sets the rates of update ``u``).
      Default: AdamW of :func:`~biformer.engine.optim.build_optimizer` and ``cfg.lr x LRSchedule``.
    - ``train_batches(epoch, start_step, runtime) -> Iterable``: this rank's micro-batches of
      ``epoch`` from update ``start_step`` on, in the slot order :func:`epoch_batches` describes.
      Default: ``train_dataset()`` through ``collate`` in :func:`epoch_batches`' order.
    - ``skipped_images(batch) -> Sequence[str]``: the unreadable images the loader replaced in
      ``batch``; they are warned about and counted (metrics.csv's ``train_skipped``).
    - ``validation_columns(evaluated) -> dict``: metrics.csv's columns from ``{candidate: figures}``
      (candidates: ``model``, ``ema``). Default: ``val_<figure>``, ``ema_val_<figure>``.
    - ``unusable(figures) -> Optional[str]``: why one candidate's figures must not compete for
      best.safetensors (warned). Default: a primary metric that is not finite.
    - ``summary(evaluated) -> str``: the validation part of the line logged each epoch.
    - ``state_dict() -> dict`` / ``load_state_dict(state)``: what the task keeps in ``state.pt``
      (under ``task_state``); ``load_state_dict`` refuses a state that is not this run's.
    """

    name: str  # "classification", "detection", "segmentation": in messages and the state file
    primary: str  # the figure of evaluate() that picks best.safetensors (higher is better)
    resume_command: str  # e.g. "biformer detect train --resume": how a user continues a run

    def build_model(self) -> nn.Module:
        """The model, on the CPU; called once, with torch seeded, before ``train_dataset``."""
        ...

    def train_dataset(self) -> Dataset: ...

    def collate(self, items: List[Any]) -> Any: ...

    def losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, Tensor]: ...

    def evaluate(self, model: nn.Module, runtime: Runtime) -> Dict[str, float]:
        """Figures of ``model`` on the validation set (empty: no validation set). Every rank calls
        it and gets the same figures; each should evaluate only its shard."""
        ...

    def save(self, path: Path, model: nn.Module, extra: Dict[str, str]) -> None: ...

    def describe(self) -> str: ...


@dataclass
class EngineConfig:
    output: Path
    epochs: int
    batch_size: int  # per process and micro-step
    lr: float  # peak learning rate (the default optimization's; also shown in the log)
    weight_decay: float
    # the default optimization's LRSchedule arguments besides total_steps; milestones in epochs
    schedule: Dict[str, Any] = field(default_factory=dict)
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"  # timm's dispatch_clip_grad: norm, value or agc
    amp: str = "none"
    sync_bn: bool = False
    ema_decay: Optional[float] = None  # keep an EMA of the weights (timm's ModelEmaV3) with this decay
    num_workers: int = 0
    seed: int = 0
    log_every: int = 20
    save_every: int = 0  # updates between mid-epoch checkpoints (0: only at epoch ends)
    eval_every: int = 1  # epochs between validations (the last epoch always validates)
    progress: bool = True
    tensorboard: bool = True


class SeededSamples(Dataset):
    """``dataset[index]`` with the torch RNG seeded by the key's seed: a sample's augmentation depends
    on the sample's place in the epoch, not on the process or worker that loads it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def epoch_batches(num_samples: int, epoch: int, cfg: EngineConfig, runtime: Runtime,
                  start_step: int = 0) -> List[List[Tuple[int, int]]]:
    """This rank's micro-batches of ``epoch`` from ``start_step`` on, as ``(index, seed)`` keys.

    Update ``s`` takes the global batch ``perm[s * G: (s + 1) * G]``; slot ``m * world + rank`` of it
    (``B`` samples) goes to micro-step ``m`` of ``rank``. The last incomplete global batch is dropped."""
    world, b = runtime.world_size, cfg.batch_size
    global_batch = b * cfg.accum_steps * world
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch))
    perm = torch.randperm(num_samples, generator=generator).tolist()
    batches = []
    for step in range(start_step, num_samples // global_batch):
        for micro in range(cfg.accum_steps):
            start = step * global_batch + (micro * world + runtime.rank) * b
            batches.append([(perm[p], derived_seed(cfg.seed, epoch, p)) for p in range(start, start + b)])
    return batches


@dataclass
class EpochMeter:
    """Running sums of an epoch, kept in the state so a resumed epoch reports the same figures."""

    loss_sum: float = 0.0  # sum over updates of the global mean loss (main rank after a reduce)
    updates: int = 0
    images: int = 0
    skipped: int = 0  # unreadable training images the loader replaced (main rank after a reduce)
    seconds: float = 0.0


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    step: int = 0  # completed updates within it
    best: float = -math.inf
    best_epoch: int = -1
    history: List[Dict[str, Any]] = field(default_factory=list)
    meter: EpochMeter = field(default_factory=EpochMeter)


class Engine:
    """Trains ``task``'s model for ``cfg.epochs``; ``resume`` continues from ``cfg.output/state.pt``."""

    def __init__(self, task: Task, cfg: EngineConfig, runtime: Runtime, resume: bool = False) -> None:
        self.task, self.cfg, self.runtime = task, cfg, runtime
        self.out = Path(cfg.output)
        device = runtime.device
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = task.build_model()
        self.train_set = task.train_dataset()
        self.global_batch = cfg.batch_size * cfg.accum_steps * runtime.world_size
        self.steps_per_epoch = len(self.train_set) // self.global_batch  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise UserValueError(
                f"the training set has {len(self.train_set)} images, fewer than one global batch of "  # type: ignore[arg-type]
                f"{self.global_batch} (processes x --batch-size x --accum-steps); lower --batch-size")
        if cfg.sync_bn and runtime.distributed:
            if device.type != "cuda":
                raise UserValueError("got --sync-bn on CPU processes; torch's SyncBatchNorm needs GPUs (on CPUs the "
                                     "BatchNorm statistics are averaged over processes at every checkpoint instead)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device)
        self.ema: Any = None
        if cfg.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        if runtime.distributed:
            import warnings

            from torch.nn.parallel import DistributedDataParallel

            # CPU depthwise-conv grads come back with another stride on their size-1 dim (same memory
            # layout); DDP warns about it once per process, to no purpose.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.train_model: nn.Module = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=getattr(task, "find_unused_parameters", False))
        else:
            self.train_model = self.model
        configure = getattr(task, "configure_optimization", None) or self._default_optimization
        self.optimizer, self.schedule = configure(self.model, self.steps_per_epoch, runtime.world_size)
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.saved_update: Optional[int] = None  # the update state.pt holds, once there is one
        if resume:
            self.load_state()
        self.run_log: Optional[RunLog] = None  # opened by fit(), once the run folder exists

    def _default_optimization(self, model: nn.Module, steps_per_epoch: int,
                              world_size: int) -> Tuple[torch.optim.Optimizer, Schedule]:
        cfg = self.cfg
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        total = cfg.epochs * steps_per_epoch
        sched = dict(cfg.schedule)
        sched["milestones"] = tuple(round(m * steps_per_epoch) for m in sched.get("milestones", ()))
        sched["warmup_steps"] = min(int(sched.get("warmup_steps", 0)), total // 4)
        return optimizer, ScaledSchedule(optimizer, cfg.lr, LRSchedule(total_steps=total, **sched))

    @property
    def update_index(self) -> int:
        return self.state.epoch * self.steps_per_epoch + self.state.step

    def candidates(self) -> Dict[str, nn.Module]:
        """The weights validated at an epoch's end, by the name metrics.csv and the metadata use."""
        return {"model": self.model, **({"ema": self.ema.module} if self.ema is not None else {})}

    # ---- state

    def save_state(self) -> None:
        """Write ``state.pt`` (main process). Called by every rank at the same points."""
        if not self.runtime.is_main:
            return
        task_state = getattr(self.task, "state_dict", None)
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "task": self.task.name,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()} if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch, "step": self.state.step, "global_batch": self.global_batch,
            "best": self.state.best, "best_epoch": self.state.best_epoch, "history": self.state.history,
            "meter": dict(self.state.meter.__dict__),
            "task_state": task_state() if task_state is not None else None,
        }
        # the previous state.pt stays whole until this one is complete (a full disk keeps it too)
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))
        self.saved_update = self.update_index

    def load_state(self) -> None:
        path = self.out / STATE_FILE
        again = "start a new run there with --overwrite, or choose another --output"
        if not path.is_file():
            raise UserError(f"no training state to resume at {str(path)!r}: the run stopped before its first "
                            f"checkpoint; {again}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, overwritten or not a torch file: torch's error type varies
            raise UserError(f"cannot resume from {str(path)!r}: it is damaged or not a training state "
                            f"({describe_load_error(e)[:300]}); {again}") from e
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("task") != self.task.name:
            found = (state.get("task") or state.get("format") or "unknown") if isinstance(state, dict) else "unknown"
            raise UserError(f"cannot resume from {str(path)!r}: it is not a {self.task.name} training state "
                            f"(found {found}); {again}")
        if state.get("global_batch") != self.global_batch:
            raise UserError(f"cannot resume from {str(path)!r}: it was trained with a global batch of "
                            f"{state.get('global_batch')}, now it is {self.global_batch}: keep processes x "
                            "--batch-size x --accum-steps equal to resume it")
        check_task_state = getattr(self.task, "load_state_dict", None)
        if check_task_state is not None:
            check_task_state(state.get("task_state") or {})
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scheduler") is not None:  # none in a dense run's state of version 1 (stateless)
                self.schedule.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.state = TrainState(epoch=state["epoch"], step=state["step"], best=state["best"],
                                    best_epoch=state["best_epoch"], history=list(state["history"]),
                                    meter=EpochMeter(**state["meter"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # the right format, but damaged content
            raise UserError(f"cannot resume from {str(path)!r}: its content is incomplete or does not fit the "
                            f"model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
        self.saved_update = self.update_index
        if not self.runtime.is_main:  # the saved sums are global; other ranks add only their new part
            self.state.meter.loss_sum, self.state.meter.skipped = 0.0, 0
        log(f"resumed {self.out} at epoch {self.state.epoch + 1}, update {self.update_index}", self.runtime)

    # ---- the loop

    def fit(self) -> TrainState:
        try:
            self._fit()
        except DiskFullError as e:
            raise DiskFullError(f"{e}; free some space, then continue with: {self.task.resume_command} {self.out}") from e
        except OSError as e:  # e.g. appending to steps.csv
            if not is_disk_full(e, self.out):
                raise
            raise DiskFullError(f"no space left on device in {str(self.out)!r} ({e}); free some space, then "
                                f"continue with: {self.task.resume_command} {self.out}") from e
        finally:
            if self.run_log is not None:
                self.run_log.close()
        return self.state

    def _fit(self) -> None:
        cfg = self.cfg
        self.run_log = RunLog(self.out, self.runtime.is_main, cfg.tensorboard, resume_update=self.update_index)
        log(f"{self.task.describe()} | {len(self.train_set)} train images | {self.runtime.world_size} process(es) "  # type: ignore[arg-type]
            f"on {self.runtime.device.type}, global batch {self.global_batch}, lr {cfg.lr:.3g}, {cfg.epochs} epochs x "
            f"{self.steps_per_epoch} updates | output {self.out}", self.runtime)
        while self.state.epoch < cfg.epochs:
            self.train_epoch()
            self.end_epoch()
        barrier(self.runtime)
        if self.runtime.is_main and self.state.history:
            primary, history = self.task.primary, self.state.history
            plot_curves(history, self.out / "curves.png",
                        metrics=[k for k in (f"val_{primary}", f"ema_val_{primary}") if any(k in row for row in history)])
            last = self.out / "last.safetensors"
            if self.state.best_epoch >= 0:
                log(f"done: best val {primary} {self.state.best:.4f} (epoch {self.state.best_epoch + 1}); "
                    f"weights in {self.out / 'best.safetensors'} and {last}")
            elif any(f"val_{primary}" in row for row in history):
                log(f"done: no epoch gave a finite val {primary}, so there is no best.safetensors; "
                    f"the last weights are in {last}")
            else:
                log(f"done: weights in {last}")

    def _stop_if_diverged(self, first_bad: float, bad_loss: float) -> None:
        """Raise :class:`TrainingDiverged` if any rank saw a non-finite loss (``first_bad``: the
        first such update here, inf if none). Called by every rank at the same updates."""
        box = torch.tensor([first_bad], dtype=torch.float64, device=self.runtime.device)
        first = float(all_reduce_min(box, self.runtime)[0])
        if math.isinf(first):
            return
        loss = f"loss {bad_loss}" if first == first_bad else "a non-finite loss on another process"
        kept = (f"{self.out / STATE_FILE} keeps the last good state (update {self.saved_update})"
                if self.saved_update is not None else "no training state had been saved yet")
        raise TrainingDiverged(f"the training loss diverged at update {int(first)} ({loss}); the run stopped and "
                               f"{kept}; lower --lr or set --clip-grad")

    def _train_batches(self, epoch: int) -> Iterable[Any]:
        own = getattr(self.task, "train_batches", None)
        if own is not None:
            return own(epoch, self.state.step, self.runtime)
        from torch.utils.data import DataLoader

        batches = epoch_batches(len(self.train_set), epoch, self.cfg, self.runtime, self.state.step)  # type: ignore[arg-type]
        return DataLoader(SeededSamples(self.train_set), batch_sampler=batches, collate_fn=self.task.collate,
                          num_workers=self.cfg.num_workers)

    def _count_skipped(self, batch: Any) -> None:
        skipped_images = getattr(self.task, "skipped_images", None)
        if skipped_images is None:
            return
        skipped = skipped_images(batch)
        for name in skipped:  # every rank reports its own
            log(f"warning: skipped unreadable image {name} (replaced by another image)")
        self.state.meter.skipped += len(skipped)

    def _optimizer_step(self, update: int) -> None:
        cfg = self.cfg
        if cfg.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=update + 1)

    def train_epoch(self) -> None:
        from .._extras import require

        require("tqdm", extra="train")  # one clear error when the extra is absent
        from tqdm import tqdm

        cfg, runtime, device = self.cfg, self.runtime, self.runtime.device
        epoch = self.state.epoch
        self.train_model.train()
        meter = self.state.meter
        slots = runtime.world_size * cfg.accum_steps
        batches = iter(self._train_batches(epoch))
        bar = tqdm(total=self.steps_per_epoch, initial=self.state.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not show_progress(cfg.progress, runtime.is_main), dynamic_ncols=True, leave=False)
        since_log = started = time.perf_counter()
        images_since_log = 0
        first_bad, bad_loss = math.inf, math.nan  # the first update here whose loss was not finite
        for step in range(self.state.step, self.steps_per_epoch):
            update = epoch * self.steps_per_epoch + step
            self.schedule.set_update(update)
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.accum_steps):
                batch = next(batches)
                self._count_skipped(batch)
                # the model's own draws (drop path, mixup, proposal sampling) depend on the update and slot only
                seed_all(derived_seed(cfg.seed, update, micro * runtime.world_size + runtime.rank))
                last_micro = micro == cfg.accum_steps - 1
                sync = contextlib.nullcontext() if last_micro or not runtime.distributed else self.train_model.no_sync()
                with sync:
                    with autocast(device, self.amp_dtype):
                        losses = self.task.losses(self.train_model, batch, device)
                        loss = sum(losses.values())
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                loss_sum += loss.detach().float()
            self._optimizer_step(update)
            images_since_log += self.global_batch
            meter.images += self.global_batch
            # the global mean loss of this update: every rank reduces at the same updates
            local_loss = loss_sum.item() / slots
            if not math.isfinite(local_loss) and math.isinf(first_bad):
                first_bad, bad_loss = float(update + 1), local_loss
            is_last = step == self.steps_per_epoch - 1
            save_now = cfg.save_every > 0 and (update + 1) % cfg.save_every == 0 and not is_last
            if (update + 1) % cfg.log_every == 0 or is_last or save_now:
                # before anything is logged or saved: a diverged model must not replace the last good state
                self._stop_if_diverged(first_bad, bad_loss)
                step_loss = all_reduce_sum(loss_sum / slots, runtime).item()
                now = time.perf_counter()
                rate = images_since_log / max(now - since_log, 1e-9)
                self.run_log.step(dict(update=update + 1, epoch=epoch + 1, step=step + 1, loss=step_loss, lr=lr,  # type: ignore[union-attr]
                                       img_per_s=rate))
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                since_log, images_since_log = now, 0
            meter.loss_sum += local_loss  # local; reduced at the epoch end or a checkpoint
            meter.updates += 1
            bar.update(1)
            self.state.step = step + 1
            if save_now:
                meter.seconds += time.perf_counter() - started
                started = time.perf_counter()
                self._reduce_meter()
                self._sync_norm_statistics()
                self.save_state()
        meter.seconds += time.perf_counter() - started
        bar.close()

    def _reduce_meter(self) -> None:
        """The main rank keeps the global sums (and saves them); the others restart theirs from zero.
        In place: train_epoch holds a reference to the meter and keeps adding to it."""
        meter = self.state.meter
        sums = all_reduce_sum(torch.tensor([meter.loss_sum, meter.skipped], dtype=torch.float64,
                                           device=self.runtime.device), self.runtime)
        if self.runtime.is_main:
            meter.loss_sum, meter.skipped = float(sums[0]), int(sums[1])
        else:
            meter.loss_sum, meter.skipped = 0.0, 0

    def _sync_norm_statistics(self) -> None:
        """Average BatchNorm running statistics over ranks (timm's ``--dist-bn reduce``).

        DDP broadcasts rank 0's buffers before each forward, but each rank's last forward then
        updates its own copy with its own batch; without this, rank k would validate weights that
        differ from the ones rank 0 saves."""
        if not self.runtime.distributed:
            return
        from timm.utils import distribute_bn

        for model in self.candidates().values():
            distribute_bn(model, self.runtime.world_size, reduce=True)

    # ---- the epoch's end

    def _validation_columns(self, evaluated: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
        own = getattr(self.task, "validation_columns", None)
        if own is not None:
            return own(evaluated)
        columns: Dict[str, Any] = {}
        for name, figures in evaluated.items():
            prefix = "" if name == "model" else f"{name}_"
            columns.update({f"{prefix}val_{k}": v for k, v in figures.items()})
        return columns

    def _unusable(self, figures: Dict[str, float]) -> Optional[str]:
        own = getattr(self.task, "unusable", None)
        if own is not None:
            return own(figures)
        value = figures.get(self.task.primary)
        return f"val {self.task.primary} is {value}" if value is not None and not math.isfinite(value) else None

    def _summary(self, evaluated: Dict[str, Dict[str, float]]) -> str:
        own = getattr(self.task, "summary", None)
        if own is not None:
            return own(evaluated)
        if not evaluated.get("model"):
            return "no validation set"
        shown = "  ".join(f"{k} {v:.4f}" for k, v in evaluated["model"].items())
        primary = self.task.primary
        for name, figures in evaluated.items():
            if name != "model" and primary in figures:
                shown += f" | {CANDIDATE_LABELS[name]} {primary} {figures[primary]:.4f}"
        return shown

    def _best_candidate(self, epoch: int, evaluated: Dict[str, Dict[str, float]]) -> Optional[Tuple[str, float]]:
        """``(candidate, primary figure)`` of the best usable evaluation this epoch (the model on a tie)."""
        best: Optional[Tuple[str, float]] = None
        primary = self.task.primary
        for name, figures in evaluated.items():
            if primary not in figures:
                continue
            problem = self._unusable(figures)
            if problem is not None:
                log(f"warning: epoch {epoch + 1}: {problem} ({CANDIDATE_LABELS[name]}); its val {primary} cannot "
                    "become the best", self.runtime)
                continue
            if best is None or figures[primary] > best[1]:
                best = (name, figures[primary])
        return best

    def end_epoch(self) -> None:
        cfg, runtime, primary = self.cfg, self.runtime, self.task.primary
        epoch = self.state.epoch
        self._reduce_meter()
        meter = self.state.meter
        self._sync_norm_statistics()
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        candidates = self.candidates()
        evaluated = {name: self.task.evaluate(model, runtime) for name, model in candidates.items()} if due else {}
        self.model.train()
        row: Dict[str, Any] = {
            "epoch": epoch + 1, "update": (epoch + 1) * self.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"], "train_loss": meter.loss_sum / max(meter.updates, 1),
        }
        if hasattr(self.task, "skipped_images"):
            row["train_skipped"] = meter.skipped
        row.update(seconds=meter.seconds, img_per_s=meter.images / max(meter.seconds, 1e-9))
        row.update(self._validation_columns(evaluated))
        model_figures = evaluated.get("model", {})
        extra = {"epoch": str(epoch + 1), "weights": "model"}
        if primary in model_figures:
            extra[f"val_{primary}"] = f"{model_figures[primary]:.4f}"
        if runtime.is_main:
            self.task.save(self.out / "last.safetensors", self.model, extra)
        best = self._best_candidate(epoch, evaluated)
        if best is not None and best[1] > self.state.best:
            name, value = best
            self.state.best, self.state.best_epoch = value, epoch
            if runtime.is_main:
                self.task.save(self.out / "best.safetensors", candidates[name],
                               {"epoch": str(epoch + 1), f"val_{primary}": f"{value:.4f}", "weights": name})
        if self.state.best_epoch >= 0 or any(primary in figures for figures in evaluated.values()):
            row[f"best_{primary}"] = self.state.best if self.state.best_epoch >= 0 else None  # none yet: empty
        self.state.history.append(row)
        self.run_log.epoch(self.state.history)  # type: ignore[union-attr]
        skipped = f" | skipped {meter.skipped} train images" if meter.skipped else ""
        summary = self._summary(evaluated) if evaluated else "not validated this epoch"
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} | {summary}{skipped} | "
            f"{meter.seconds:.1f} s, {row['img_per_s']:.0f} img/s", runtime)
        self.state.epoch, self.state.step, self.state.meter = epoch + 1, 0, EpochMeter()
        self.save_state()


# ---- the run folder --------------------------------------------------------------------------


def run_config_text(options: Dict[str, Any], header: Sequence[str]) -> str:
    """``config.yaml``'s text: the header as comments, then the options."""
    import yaml

    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(options, sort_keys=False)


def write_run_config(out: Path, text: str, runtime: Runtime) -> None:
    """The run's resolved options as ``config.yaml`` (main process); ``--resume`` reads them back."""
    if runtime.is_main:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(out / CONFIG_FILE, write)
    barrier(runtime)


def read_run_config(out: Path) -> Dict[str, Any]:
    """The options ``write_run_config`` saved in ``out`` (for ``--resume``)."""
    import yaml

    path = out / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"--resume {out}: no {CONFIG_FILE} there, so it is not a run folder of this command")
    try:
        options = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"--resume {out}: {CONFIG_FILE} is damaged ({str(e).splitlines()[0]})") from e
    if not isinstance(options, dict):
        raise UserError(f"--resume {out}: {CONFIG_FILE} does not hold the run's options")
    return options


# what a command sets up for a run: (task, engine config, config.yaml's text), given the runtime
RunSetup = Callable[[Runtime], Tuple[Task, EngineConfig, str]]


def run_in_folder(runtime: Runtime, setup: RunSetup, resume: bool, overwrite: bool,
                  note: Callable[[str], None] = log) -> Engine:
    """Set up the task (bad data is refused before a run folder is made), lock and prepare the run
    folder (refusal, --overwrite, a stale lock), write config.yaml, then train. Returns the engine."""
    from .rundir import prepare_run_folder
    from .runtime import on_main_first

    task, cfg, config_text = setup(runtime)
    out = Path(cfg.output)
    # only rank 0 writes, so only rank 0 locks; the others learn the outcome from it
    lock = on_main_first(runtime, lambda: prepare_run_folder(out, resume, overwrite, note=note))
    try:
        engine = Engine(task, cfg, runtime, resume=resume)
        write_run_config(out, config_text, runtime)
        engine.fit()
    finally:
        if lock is not None:
            lock.release()
    return engine


def run_task(device: str, setup: RunSetup, resume: bool, overwrite: bool) -> Engine:
    """:func:`run_in_folder` in a runtime of its own (torchrun's processes, or one)."""
    from .runtime import init_runtime, shutdown

    runtime = init_runtime(device)

    def configured(runtime: Runtime) -> Tuple[Task, EngineConfig, str]:
        task, cfg, config_text = setup(runtime)
        if runtime.device.type == "cpu":  # threads that leave room for workers and other processes
            import os

            from . import threads

            threads.configure_cpu_threads(cfg.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return task, cfg, config_text

    try:
        return run_in_folder(runtime, configured, resume, overwrite)
    finally:
        shutdown(runtime)


# options that say where and how a run executes, never what it computes: --resume may change them
RUNTIME_OPTIONS = ("device", "num_workers", "progress", "tensorboard")


def resolve_options(args: Any, command: str) -> Tuple[Dict[str, Any], bool]:
    """``(options, resume)``: the command line's options, or with ``--resume RUN`` the run's saved ones
    (only :data:`RUNTIME_OPTIONS` taken from this command line)."""
    options = {k: v for k, v in vars(args).items() if k not in ("action", "resume", "overwrite")}
    if args.resume is None:
        if not args.output:
            raise UserValueError(f"{command}: give --output RUN (a new run folder) or --resume RUN")
        return options, False
    if args.overwrite:
        raise UserValueError("got both --resume and --overwrite; --resume continues the run, --overwrite starts again")
    saved = read_run_config(Path(args.resume))
    saved.update({k: options[k] for k in RUNTIME_OPTIONS})
    saved["output"] = str(args.resume)
    return saved, True


def engine_config(options: Dict[str, Any], weight_decay: float, schedule: Dict[str, Any]) -> EngineConfig:
    return EngineConfig(
        output=Path(options["output"]), epochs=options["epochs"], batch_size=options["batch_size"],
        accum_steps=options["accum_steps"], lr=options["lr"],
        weight_decay=weight_decay if options["weight_decay"] is None else options["weight_decay"],
        schedule=schedule, clip_grad=options["clip_grad"], amp=options["amp"], sync_bn=options["sync_bn"],
        num_workers=options["num_workers"], seed=options["seed"], log_every=options["log_every"],
        save_every=options["save_every"], eval_every=options["eval_every"], progress=options["progress"],
        tensorboard=options["tensorboard"])


ENGINE_POSITIVE = ("epochs", "batch_size", "accum_steps", "lr", "log_every", "eval_every", "clip_grad")
ENGINE_NON_NEGATIVE = ("weight_decay", "warmup_steps", "save_every", "num_workers")
