"""The training loop detection and segmentation share: one process or many (torchrun, DDP), AMP,
exact resume, the run folder's logs. A task plugs in through :class:`Task`.

Files in the run folder ``cfg.output``:

- ``config.yaml``: the command's resolved options (``--resume RUN`` reads them back);
- ``last.safetensors`` / ``best.safetensors``: the task model (best: the highest ``primary`` metric);
- ``state.pt``: model, optimizer, AMP scaler, epoch, step in the epoch, metrics so far;
- ``metrics.csv`` (one row per epoch), ``steps.csv``, ``tb/``, ``curves.png``.

Random draws are seeded from ``(seed, epoch, position)`` (data augmentation) and ``(seed, update,
slot)`` (the model's own draws), where a slot is ``micro_step * world_size + rank``. So a resumed run
continues exactly as the uninterrupted one, and N processes with batch B compute what one process
with batch B and N accumulation steps computes.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import Dataset

from ..checkpoint import DiskFullError, atomic_write, describe_load_error, is_disk_full
from ..errors import UserError, UserValueError
from .logs import RunLog, plot_curves, show_progress
from .optim import LRSchedule, build_optimizer
from .runtime import Runtime, all_reduce_min, all_reduce_sum, autocast, barrier, resolve_amp

__all__ = ["Engine", "EngineConfig", "Task", "TrainingDiverged", "derived_seed", "log", "write_run_config"]

STATE_FORMAT = "biformer-task-state"
STATE_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


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


class Task(Protocol):
    """What a task gives the engine."""

    name: str  # "detection", "segmentation": in messages and the state file
    primary: str  # the metrics key that picks best.safetensors (higher is better)
    resume_command: str  # e.g. "biformer detect train --resume": how a user continues a run
    # (optional) True when some parameters get no gradient on some batches (a detector's box head
    # on an image without objects); DDP then looks for them every update
    find_unused_parameters: bool

    def build_model(self) -> nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def collate(self, items: List[Any]) -> Any: ...

    def losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, Tensor]: ...

    def evaluate(self, model: nn.Module, runtime: Runtime) -> Dict[str, float]:
        """Metrics of ``model`` on the validation set (empty: no validation set). Every rank calls
        it and gets the same figures; each should evaluate only its shard."""
        ...

    def save(self, path: Path, model: nn.Module, extra: Dict[str, str]) -> None: ...

    def describe(self) -> str: ...


@dataclass
class EngineConfig:
    output: Path
    epochs: int
    batch_size: int  # per process and micro-step
    lr: float
    weight_decay: float
    schedule: Dict[str, Any]  # LRSchedule's arguments besides total_steps; milestones in epochs
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    amp: str = "none"
    sync_bn: bool = False
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
    loss_sum: float = 0.0  # sum over updates of the global mean loss (main rank after a reduce)
    updates: int = 0
    images: int = 0
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
        self.train_set = task.train_dataset()
        self.global_batch = cfg.batch_size * cfg.accum_steps * runtime.world_size
        self.steps_per_epoch = len(self.train_set) // self.global_batch  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise UserValueError(
                f"the training set has {len(self.train_set)} images, fewer than one global batch of "  # type: ignore[arg-type]
                f"{self.global_batch} (processes x --batch-size x --accum-steps); lower --batch-size")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = task.build_model()
        if cfg.sync_bn and runtime.distributed:
            if device.type != "cuda":
                raise UserValueError("got --sync-bn on CPU processes; torch's SyncBatchNorm needs GPUs (on CPUs the "
                                     "BatchNorm statistics are averaged over processes at every checkpoint instead)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device)
        if runtime.distributed:
            import warnings

            from torch.nn.parallel import DistributedDataParallel

            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.train_model: nn.Module = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=getattr(task, "find_unused_parameters", False))
        else:
            self.train_model = self.model
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        total = cfg.epochs * self.steps_per_epoch
        sched = dict(cfg.schedule)
        sched["milestones"] = tuple(round(m * self.steps_per_epoch) for m in sched.get("milestones", ()))
        sched["warmup_steps"] = min(int(sched.get("warmup_steps", 0)), total // 4)
        self.schedule = LRSchedule(total_steps=total, **sched)
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.saved_update: Optional[int] = None
        if resume:
            self.load_state()
        self.run_log: Optional[RunLog] = None

    @property
    def update_index(self) -> int:
        return self.state.epoch * self.steps_per_epoch + self.state.step

    # ---- state

    def save_state(self) -> None:
        """Write ``state.pt`` (main process). Called by every rank at the same points."""
        if not self.runtime.is_main:
            return
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "task": self.task.name,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch, "step": self.state.step, "global_batch": self.global_batch,
            "best": self.state.best, "best_epoch": self.state.best_epoch, "history": self.state.history,
            "meter": dict(self.state.meter.__dict__),
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
            found = state.get("task", "unknown") if isinstance(state, dict) else "unknown"
            raise UserError(f"cannot resume from {str(path)!r}: it is not a {self.task.name} training state "
                            f"(found {found}); {again}")
        if state.get("global_batch") != self.global_batch:
            raise UserError(f"cannot resume from {str(path)!r}: it was trained with a global batch of "
                            f"{state.get('global_batch')}, now it is {self.global_batch}: keep processes x "
                            "--batch-size x --accum-steps equal to resume it")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.state = TrainState(epoch=state["epoch"], step=state["step"], best=state["best"],
                                    best_epoch=state["best_epoch"], history=list(state["history"]),
                                    meter=EpochMeter(**state["meter"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot resume from {str(path)!r}: its content is incomplete or does not fit the "
                            f"model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
        self.saved_update = self.update_index
        if not self.runtime.is_main:  # the saved sums are global; other ranks add only their new part
            self.state.meter.loss_sum = 0.0
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
            f"on {self.runtime.device.type}, global batch {self.global_batch}, {cfg.epochs} epochs x "
            f"{self.steps_per_epoch} updates | output {self.out}", self.runtime)
        while self.state.epoch < cfg.epochs:
            self.train_epoch()
            self.end_epoch()
        barrier(self.runtime)
        if self.runtime.is_main and self.state.history:
            metric = f"val_{self.task.primary}"
            plot_curves(self.state.history, self.out / "curves.png",
                        metrics=[metric] if metric in self.state.history[-1] else [])
            best = (f"best val {self.task.primary} {self.state.best:.4f} (epoch {self.state.best_epoch + 1}); "
                    if self.state.best_epoch >= 0 else "")
            log(f"done: {best}weights in {self.out / 'last.safetensors'}"
                + (f" and {self.out / 'best.safetensors'}" if best else ""))

    def _stop_if_diverged(self, first_bad: float, bad_loss: float) -> None:
        box = torch.tensor([first_bad], dtype=torch.float64, device=self.runtime.device)
        first = float(all_reduce_min(box, self.runtime)[0])
        if math.isinf(first):
            return
        loss = f"loss {bad_loss}" if first == first_bad else "a non-finite loss on another process"
        kept = (f"{self.out / STATE_FILE} keeps the last good state (update {self.saved_update})"
                if self.saved_update is not None else "no training state had been saved yet")
        raise TrainingDiverged(f"the training loss diverged at update {int(first)} ({loss}); the run stopped and "
                               f"{kept}; lower --lr or set --clip-grad")

    def _loader(self, epoch: int) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        batches = epoch_batches(len(self.train_set), epoch, self.cfg, self.runtime, self.state.step)  # type: ignore[arg-type]
        return iter(DataLoader(SeededSamples(self.train_set), batch_sampler=batches, collate_fn=self.task.collate,
                               num_workers=self.cfg.num_workers))

    def train_epoch(self) -> None:
        from tqdm import tqdm

        cfg, runtime, device = self.cfg, self.runtime, self.runtime.device
        epoch = self.state.epoch
        self.train_model.train()
        meter = self.state.meter
        slots = runtime.world_size * cfg.accum_steps
        batches = self._loader(epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=self.state.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not show_progress(cfg.progress, runtime.is_main), dynamic_ncols=True, leave=False)
        since_log = started = time.perf_counter()
        images_since_log = 0
        first_bad, bad_loss = math.inf, math.nan
        for step in range(self.state.step, self.steps_per_epoch):
            update = epoch * self.steps_per_epoch + step
            lr = cfg.lr * self.schedule(update)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.accum_steps):
                batch = next(batches)
                # the model's own draws (drop path, proposal sampling) depend on the update and slot only
                torch.manual_seed(derived_seed(cfg.seed, update, micro * runtime.world_size + runtime.rank))
                last_micro = micro == cfg.accum_steps - 1
                sync = contextlib.nullcontext() if last_micro or not runtime.distributed else self.train_model.no_sync()
                with sync:
                    with autocast(device, self.amp_dtype):
                        losses = self.task.losses(self.train_model, batch, device)
                        loss = sum(losses.values())
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                loss_sum += loss.detach().float()
            if cfg.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            images_since_log += self.global_batch
            meter.images += self.global_batch
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
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                since_log, images_since_log = now, 0
            meter.loss_sum += local_loss
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
        """The main rank keeps the global loss sum (and saves it); the others restart theirs from zero."""
        meter = self.state.meter
        total = all_reduce_sum(torch.tensor([meter.loss_sum], dtype=torch.float64, device=self.runtime.device),
                               self.runtime)
        meter.loss_sum = float(total[0]) if self.runtime.is_main else 0.0

    def _sync_norm_statistics(self) -> None:
        """Average BatchNorm running statistics over ranks, so every rank evaluates the saved weights."""
        if not self.runtime.distributed:
            return
        from timm.utils import distribute_bn

        distribute_bn(self.model, self.runtime.world_size, reduce=True)

    def end_epoch(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        epoch = self.state.epoch
        self._reduce_meter()
        loss_sum = self.state.meter.loss_sum if runtime.is_main else 0.0
        meter = self.state.meter
        self._sync_norm_statistics()
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        metrics = self.task.evaluate(self.model, runtime) if due else {}
        self.model.train()
        row: Dict[str, Any] = {
            "epoch": epoch + 1, "update": (epoch + 1) * self.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / max(meter.updates, 1),
            "seconds": meter.seconds, "img_per_s": meter.images / max(meter.seconds, 1e-9),
        }
        row.update({f"val_{k}": v for k, v in metrics.items()})
        if runtime.is_main:
            self.task.save(self.out / "last.safetensors", self.model, {"epoch": str(epoch + 1)})
        primary = metrics.get(self.task.primary)
        if primary is not None and math.isfinite(primary) and primary > self.state.best:
            self.state.best, self.state.best_epoch = primary, epoch
            if runtime.is_main:
                self.task.save(self.out / "best.safetensors", self.model,
                               {"epoch": str(epoch + 1), self.task.primary: f"{primary:.4f}"})
        if self.state.best_epoch >= 0:
            row[f"best_{self.task.primary}"] = self.state.best
        self.state.history.append(row)
        self.run_log.epoch(self.state.history)  # type: ignore[union-attr]
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} | {shown or 'no validation set'} | "
            f"{meter.seconds:.1f} s", runtime)
        self.state.epoch, self.state.step, self.state.meter = epoch + 1, 0, EpochMeter()
        self.save_state()


def write_run_config(out: Path, options: Dict[str, Any], header: Sequence[str], runtime: Runtime) -> None:
    """The run's resolved options as ``config.yaml`` (main process); ``--resume`` reads them back."""
    import yaml

    if runtime.is_main:
        text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(options, sort_keys=False)

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


def run_task(task_factory: Callable[[Dict[str, Any]], Tuple[Task, EngineConfig]], options: Dict[str, Any],
             resume: bool, overwrite: bool, device: str, header: Sequence[str]) -> int:
    """Set up the runtime and the run folder (lock, refusal, --overwrite), then train."""
    from .rundir import prepare_run_folder
    from .runtime import init_runtime, on_main_first, shutdown

    runtime = init_runtime(device)
    lock = None
    try:
        if runtime.device.type == "cpu":  # threads that leave room for workers and other processes
            import os

            from .threads import configure_cpu_threads

            configure_cpu_threads(options["num_workers"], int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        out = Path(options["output"])
        task, cfg = task_factory(options)  # bad data is refused before a run folder is made
        lock = on_main_first(runtime, lambda: prepare_run_folder(out, resume, overwrite, note=log))
        engine = Engine(task, cfg, runtime, resume=resume)
        write_run_config(out, options, header, runtime)
        engine.fit()
    finally:
        if lock is not None:
            lock.release()
        shutdown(runtime)
    return 0


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
