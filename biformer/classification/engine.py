"""The training loop and evaluation, for one process or many (DDP).

Built from timm's pieces: ``create_model``, ``create_transform``, ``Mixup``, ``create_optimizer_v2``,
``create_scheduler_v2``, its losses and ``ModelEmaV3``. Written here: the sampler (see
:mod:`.data`), resumable state, sharded evaluation and logging.

Files in the run directory ``cfg.output``:

- ``config.yaml``: the resolved configuration (``biformer train --config`` reruns it);
- ``last.safetensors`` / ``best.safetensors``: weights + model name, kwargs, preprocessing, classes;
- ``state.pt``: everything to resume (model, EMA, optimizer, scheduler, AMP scaler, epoch, step in
  the epoch, metrics so far), plain tensors and builtins that load with ``weights_only=True``;
- ``metrics.csv``, ``steps.csv``, ``tb/``, ``curves.png``.

Every file is replaced atomically, so a run killed at any moment resumes from its last checkpoint.
Random draws are seeded from ``(seed, epoch/update, position)`` rather than carried over, so the
resumed run continues exactly as the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import DiskFullError, atomic_write, describe_load_error, is_disk_full, load_weights, save_model
from ..errors import UserError, UserValueError
from ..models.biformer import CheckpointMismatchError
from . import data as data_lib
from .config import TrainConfig, dump_yaml, resolved_drop_path, resolved_lr, to_dict
from ..engine.logs import RunLog, plot_curves, show_progress
from ..engine.loop import TrainingDiverged, derived_seed, log
from ..engine.runtime import Runtime, all_reduce_min, all_reduce_sum, autocast, barrier, resolve_amp
from .._extras import require

STATE_FORMAT = "biformer-train-state"
STATE_VERSION = 1
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


# ---- evaluation --------------------------------------------------------------------------------


@dataclass
class EvalResult:
    num_images: int
    loss: float
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    per_class_correct: List[int]
    per_class_total: List[int]
    num_skipped: int = 0
    num_nonfinite: int = 0  # images whose logits hold NaN or inf; then loss and accuracies are NaN

    def per_class_accuracy(self) -> List[Optional[float]]:
        return [100.0 * c / t if t else None for c, t in zip(self.per_class_correct, self.per_class_total)]

    def to_dict(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        names = list(class_names) if class_names else [str(i) for i in range(len(self.per_class_total))]
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "num_images": self.num_images,
            "num_skipped": self.num_skipped,
            "num_nonfinite": self.num_nonfinite,
            "per_class": {
                name: {"top1": acc, "num_images": total}
                for name, acc, total in zip(names, self.per_class_accuracy(), self.per_class_total)
            },
        }


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, num_classes: int, runtime: Runtime,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             progress: bool = False, desc: str = "eval") -> EvalResult:
    """Top-1/top-5, mean cross-entropy and per-class accuracy; sums are reduced over ranks, and each
    rank holds a disjoint shard without padding, so the numbers equal a single process's.

    Images whose logits are not finite are counted (``num_nonfinite``); with any of them, loss and
    accuracies are NaN, since a ranking of NaN logits means nothing."""
    require("tqdm", extra="train")  # one clear error when the extra is absent
    from tqdm import tqdm

    model.eval()
    device = runtime.device
    k = min(5, num_classes)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1 hits, top-k hits, skipped, non-finite
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # hits, totals
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress(progress, runtime.is_main), dynamic_ncols=True)
    for batch in bar:
        for name in batch.skipped:
            log(f"warning: skipped unreadable image {name}")
        sums[3] += len(batch.skipped)
        if batch.images.numel() == 0:
            continue
        images = batch.images.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if int(targets.max()) >= num_classes:
            raise UserValueError(f"the data has label {int(targets.max())} but the model has only {num_classes} classes")
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()  # (B, classes)
        sums[4] += (~torch.isfinite(logits).all(dim=1)).sum()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        hits = logits.topk(k, dim=1).indices == targets[:, None]  # (B, k)
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(dim=1).sum()
        per_class[0] += torch.bincount(targets[hits[:, 0]], minlength=num_classes)
        per_class[1] += torch.bincount(targets, minlength=num_classes)
    all_reduce_sum(sums, runtime)
    all_reduce_sum(per_class, runtime)
    n = int(per_class[1].sum())
    if n == 0:
        raise UserValueError("no image could be evaluated")
    nonfinite = int(sums[4])
    nan = float("nan")
    return EvalResult(
        num_images=n,
        loss=float(sums[0]) / n if not nonfinite else nan,
        top1=100.0 * float(sums[1]) / n if not nonfinite else nan,
        top5=100.0 * float(sums[2]) / n if not nonfinite else nan,
        per_class_correct=[int(v) for v in per_class[0].tolist()],
        per_class_total=[int(v) for v in per_class[1].tolist()],
        num_skipped=int(sums[3]),
        num_nonfinite=nonfinite,
    )


# ---- model -------------------------------------------------------------------------------------


def data_config(cfg: TrainConfig, model: nn.Module) -> Dict[str, Any]:
    """Preprocessing: the config's values where set, else the model's defaults."""
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "input_size": (3, cfg.img_size, cfg.img_size),
        "interpolation": cfg.interpolation,
        "mean": tuple(cfg.mean or base.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.std or base.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": cfg.crop_pct if cfg.crop_pct is not None else base.get("crop_pct", 0.875),
    }


# ---- training ----------------------------------------------------------------------------------


@dataclass
class EpochMeter:
    """Running sums of an epoch, kept in the state so a resumed epoch reports the same figures."""

    loss_sum: float = 0.0  # sum over updates of the global mean loss
    updates: int = 0
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def state(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    step: int = 0  # completed updates within it
    best_top1: float = -1.0
    best_epoch: int = -1
    history: List[Dict[str, Any]] = field(default_factory=list)
    meter: EpochMeter = field(default_factory=EpochMeter)


class Trainer:
    """One training run. ``fit()`` trains to ``cfg.epochs``, resuming from ``cfg.output`` when asked."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, resume: bool = False) -> None:
        import timm
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        import biformer  # noqa: F401  (registers the models with timm)

        self.cfg = cfg
        self.runtime = runtime
        self.out = Path(cfg.output or "runs/unnamed")
        device = runtime.device

        # data
        self.train_source = data_lib.open_source(cfg.dataset, cfg.data, cfg.train_split)
        self.class_names = list(self.train_source.classes)
        if not self.class_names:
            raise UserValueError(f"cannot tell the classes of dataset {cfg.dataset!r}: it names none")
        self.num_classes = len(self.class_names)
        self._warn_about_classes()
        self.val_source = data_lib.open_source(cfg.dataset, cfg.data, cfg.val_split, class_names=self.class_names)

        # model: the same initial weights on every rank
        torch.manual_seed(cfg.seed)
        self.model_kwargs = {"num_classes": self.num_classes, **cfg.model_kwargs}
        try:
            model = timm.create_model(cfg.model, drop_path_rate=resolved_drop_path(cfg), **self.model_kwargs)
        except ValueError as e:  # each kwarg passed the config's checks, but together they may not build
            raise UserValueError(f"cannot build {cfg.model} with model_kwargs {cfg.model_kwargs}: {e}") from e
        if cfg.pretrained and not resume:
            not_loaded = load_weights(model, cfg.pretrained, cfg.model)
            log(f"initial weights from {cfg.pretrained}" + (f"; fresh: {not_loaded}" if not_loaded else ""), runtime)
        self.data_cfg = data_config(cfg, model)
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **self.data_cfg, "num_classes": self.num_classes}
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        if runtime.distributed:
            import warnings

            from torch.nn.parallel import DistributedDataParallel

            # CPU depthwise-conv grads come back with another stride on their size-1 dim (same memory
            # layout); DDP warns about it once per process, to no purpose.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

            self.train_model: nn.Module = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.train_model = model

        # loaders
        num_workers = cfg.num_workers if cfg.num_workers is not None else data_lib.default_num_workers()
        self.sampler = data_lib.TrainBatchSampler(
            len(self.train_source), cfg.batch_size, world_size=runtime.world_size, rank=runtime.rank,
            accum_steps=cfg.accum_steps, repeats=cfg.aug_repeats, seed=cfg.seed)
        train_samples = data_lib.ImageSamples(
            self.train_source, data_lib.build_transform(cfg, self.data_cfg, is_training=True), replace_bad=True)
        self.train_loader = data_lib.train_loader(train_samples, self.sampler, num_workers, device)
        val_samples = data_lib.ImageSamples(
            self.val_source, data_lib.build_transform(cfg, self.data_cfg, is_training=False), replace_bad=False)
        self.val_loader = data_lib.eval_loader(
            val_samples, cfg.batch_size, num_workers, device, runtime.world_size, runtime.rank)

        # optimization
        self.lr = resolved_lr(cfg, runtime.world_size)
        if self.lr < cfg.min_lr:
            # linear scaling at a small global batch can fall under the recipe's floor
            log(f"warning: lr {self.lr:.3g} is below min_lr {cfg.min_lr:.3g}, so the schedule rises instead of "
                "decaying; lower --min-lr or raise --lr", runtime)
        self.optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eps=cfg.opt_eps)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        mixup_on = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=self.num_classes) if mixup_on else None
        if mixup_on:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

        self.state = TrainState()
        self.saved_update: Optional[int] = None  # the update state.pt holds, once there is one
        if resume:
            self.load_state()
        self.run_log: Optional[RunLog] = None  # opened by fit(), once the run directory exists

    def _warn_about_classes(self) -> None:
        """One line when the training data cannot teach a classifier anything: a loss of 0 and 100%
        accuracy would otherwise look like success."""
        names = self.class_names
        if len(names) < 2:
            log(f"warning: the training data has only {len(names)} class ({', '.join(names)}); every image gets "
                "that label, so the loss goes to 0 and the accuracy to 100% whatever the model learns", self.runtime)
        counts = data_lib.class_counts(self.train_source)
        empty = sorted(set(getattr(self.train_source, "empty_class_folders", [])) |
                       {name for name, count in zip(names, counts or []) if count == 0})
        if empty:
            log(f"warning: {len(empty)} class(es) have no training images: {', '.join(empty[:10])}"
                + (" ..." if len(empty) > 10 else ""), self.runtime)

    # ---- bookkeeping

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.accum_steps * self.runtime.world_size

    @property
    def update_index(self) -> int:
        return self.state.epoch * self.steps_per_epoch + self.state.step

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters())
        return (
            f"{self.cfg.model} ({n_params / 1e6:.2f}M params, {self.num_classes} classes, preset {self.cfg.preset}) | "
            f"{len(self.train_source)} train / {len(self.val_source)} val images | "
            f"{self.runtime.world_size} process(es) on {self.runtime.device.type}, global batch {self.global_batch}, "
            f"lr {self.lr:.3g}, {self.cfg.epochs} epochs x {self.steps_per_epoch} updates | output {self.out}"
        )

    def _metadata(self, extra: Dict[str, Any]) -> Dict[str, str]:
        return {"class_names": json.dumps(self.class_names), **{k: str(v) for k, v in extra.items()}}

    def save_weights(self, name: str, model: nn.Module, extra: Dict[str, Any]) -> None:
        if self.runtime.is_main:
            save_model(self.out / name, model, self.cfg.model, self.model_kwargs, self._metadata(extra))

    def save_state(self) -> None:
        """Write ``state.pt`` (main process). Called by every rank at the same points."""
        if not self.runtime.is_main:
            return
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "model_name": self.cfg.model,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()} if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "global_batch": self.global_batch,
            "seed": self.cfg.seed,
            "best_top1": self.state.best_top1,
            "best_epoch": self.state.best_epoch,
            "history": self.state.history,
            "meter": self.state.meter.state(),
        }
        # the previous state.pt stays whole until this one is complete (a full disk keeps it too)
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))
        self.saved_update = self.update_index

    def load_state(self) -> None:
        path = self.out / STATE_FILE
        start_again = "start a new run there with --overwrite, or choose another --output"
        if not path.is_file():
            raise UserError(f"no training state to resume at {str(path)!r}: the run stopped before its first "
                            f"checkpoint; {start_again}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, overwritten or not a torch file: torch's error type varies
            raise UserError(f"cannot resume from {str(path)!r}: it is damaged or not a training state "
                            f"({describe_load_error(e)[:300]}); {start_again}") from e
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserValueError(f"{str(path)!r} is not a biformer training state; {start_again}")
        if state.get("model_name") != self.cfg.model:
            raise CheckpointMismatchError(
                f"{str(path)!r} holds a {state.get('model_name')} run, but the config trains {self.cfg.model}")
        if state.get("global_batch") != self.global_batch:
            raise UserValueError(
                f"the run was checkpointed with a global batch of {state.get('global_batch')}, now it is "
                f"{self.global_batch}: keep processes x batch_size x accum_steps equal to resume it")
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.state = TrainState(
                epoch=state["epoch"], step=state["step"], best_top1=state["best_top1"],
                best_epoch=state["best_epoch"], history=list(state["history"]), meter=EpochMeter(**state["meter"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # the right format, but damaged content
            raise UserError(f"cannot resume from {str(path)!r}: its content is incomplete or does not fit the "
                            f"model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
        self.saved_update = self.update_index
        if not self.runtime.is_main:  # the saved sums are global; other ranks add only their new part
            self.state.meter.loss_sum, self.state.meter.skipped = 0.0, 0
        log(f"resumed {self.out} at epoch {self.state.epoch + 1}, update {self.update_index}", self.runtime)

    # ---- the loop

    def fit(self) -> TrainState:
        cfg = self.cfg
        try:
            self._fit()
        except DiskFullError as e:
            raise DiskFullError(f"{e}; free some space, then continue with: biformer train --resume {self.out}") from e
        except OSError as e:  # e.g. appending to steps.csv
            if not is_disk_full(e, self.out):
                raise
            raise DiskFullError(f"no space left on device in {str(self.out)!r} ({e}); free some space, then "
                                f"continue with: biformer train --resume {self.out}") from e
        finally:
            if self.run_log is not None:
                self.run_log.close()
        return self.state

    def _fit(self) -> None:
        cfg = self.cfg
        self.run_log = RunLog(self.out, self.runtime.is_main, cfg.tensorboard, resume_update=self.update_index)
        log(self.describe(), self.runtime)
        while self.state.epoch < cfg.epochs:
            self.train_epoch()
            self.end_epoch()
        barrier(self.runtime)
        if self.runtime.is_main and self.state.history:
            plot_curves(self.state.history, self.out / "curves.png")
            best = self.state
            if best.best_epoch >= 0:
                log(f"done: best val top-1 {best.best_top1:.2f}% (epoch {best.best_epoch + 1}); "
                    f"weights in {self.out / 'best.safetensors'} and {self.out / 'last.safetensors'}")
            else:
                log(f"done: no epoch gave finite validation logits, so there is no best.safetensors; "
                    f"the last weights are in {self.out / 'last.safetensors'}")

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

    def train_epoch(self) -> None:
        require("tqdm", extra="train")  # one clear error when the extra is absent
        from tqdm import tqdm

        cfg, runtime, device = self.cfg, self.runtime, self.runtime.device
        epoch = self.state.epoch
        self.sampler.set_epoch(epoch, self.state.step)
        self.train_model.train()
        meter = self.state.meter
        slots = runtime.world_size * cfg.accum_steps
        batches = iter(self.train_loader)
        bar = tqdm(total=self.steps_per_epoch, initial=self.state.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not show_progress(cfg.progress, runtime.is_main), dynamic_ncols=True, leave=False)
        since_log = time.perf_counter()
        started = time.perf_counter()
        images_since_log = 0
        first_bad, bad_loss = math.inf, math.nan  # the first update here whose loss was not finite
        for step in range(self.state.step, self.steps_per_epoch):
            update = epoch * self.steps_per_epoch + step
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.accum_steps):
                batch = next(batches)
                for name in batch.skipped:
                    log(f"warning: skipped unreadable image {name} (replaced by another image)")
                meter.skipped += len(batch.skipped)
                images = batch.images.to(device, non_blocking=True)
                targets = batch.targets.to(device, non_blocking=True)
                # mixup and drop-path draws depend on the update and the batch slot only
                data_lib.seed_all(derived_seed(cfg.seed, update, micro * runtime.world_size + runtime.rank))
                if self.mixup is not None:
                    images, targets = self.mixup(images, targets)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                last_micro = micro == cfg.accum_steps - 1
                sync = contextlib.nullcontext() if last_micro or not runtime.distributed else self.train_model.no_sync()
                with sync:
                    with autocast(device, self.amp_dtype):
                        loss = self.criterion(self.train_model(images), targets)
                    self.scaler.scale(loss / cfg.accum_steps).backward()
                loss_sum += loss.detach().float()
            if cfg.clip_grad is not None:
                from timm.utils import dispatch_clip_grad

                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model, step=update + 1)
            self.scheduler.step_update(num_updates=update + 1)
            images_since_log += self.global_batch
            meter.images += self.global_batch

            # the global mean loss of this update: every rank reduces at the same updates
            local_loss = loss_sum.item() / slots
            if not math.isfinite(local_loss) and math.isinf(first_bad):
                first_bad, bad_loss = float(update + 1), local_loss
            is_last = step == self.steps_per_epoch - 1
            save_now = cfg.save_every > 0 and (update + 1) % cfg.save_every == 0 and not is_last
            if (update + 1) % cfg.log_interval == 0 or is_last or save_now:
                # before anything is logged or saved: a diverged model must not replace the last good state
                self._stop_if_diverged(first_bad, bad_loss)
                step_loss = all_reduce_sum(loss_sum / slots, runtime).item()
                now = time.perf_counter()
                rate = images_since_log / max(now - since_log, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                self.run_log.step(dict(update=update + 1, epoch=epoch + 1, step=step + 1, loss=step_loss, lr=lr,
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
                self._save_midepoch()
        meter.seconds += time.perf_counter() - started
        bar.close()

    def _reduced_meter(self) -> EpochMeter:
        """The epoch's sums over all ranks (each rank holds its share of every update's mean loss)."""
        meter = self.state.meter
        sums = torch.tensor([meter.loss_sum, meter.skipped], dtype=torch.float64, device=self.runtime.device)
        all_reduce_sum(sums, self.runtime)
        return EpochMeter(loss_sum=float(sums[0]), updates=meter.updates, images=meter.images,
                          skipped=int(sums[1]), seconds=meter.seconds)

    def _save_midepoch(self) -> None:
        reduced = self._reduced_meter()
        # The main rank keeps the global sums (and saves them); the others restart theirs from zero.
        # Updated in place: train_epoch holds a reference to this meter and keeps adding to it.
        meter = self.state.meter
        if self.runtime.is_main:
            meter.loss_sum, meter.skipped = reduced.loss_sum, reduced.skipped
        else:
            meter.loss_sum, meter.skipped = 0.0, 0
        self._sync_norm_statistics()  # so the saved (rank 0) EMA/BN buffers are every rank's
        self.save_state()

    def end_epoch(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        epoch = self.state.epoch
        meter = self._reduced_meter()
        self._sync_norm_statistics()
        evaluated = {"model": self._evaluate(self.model, "val")}
        if self.ema is not None:
            evaluated["ema"] = self._evaluate(self.ema.module, "val (EMA)")
        row: Dict[str, Any] = {
            "epoch": epoch + 1,
            "update": (epoch + 1) * self.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": meter.loss_sum / max(meter.updates, 1),
            "train_skipped": meter.skipped,
            "seconds": meter.seconds,
            "img_per_s": meter.images / max(meter.seconds, 1e-9),
        }
        for source, result in evaluated.items():
            prefix = "" if source == "model" else "ema_"
            row.update({f"{prefix}val_loss": result.loss, f"{prefix}val_top1": result.top1,
                        f"{prefix}val_top5": result.top5})
        row["val_images"] = evaluated["model"].num_images
        row["val_skipped"] = evaluated["model"].num_skipped
        for source, result in evaluated.items():
            if result.num_nonfinite:
                log(f"warning: epoch {epoch + 1}: {result.num_nonfinite} of {result.num_images} val images gave "
                    f"non-finite logits ({'EMA' if source == 'ema' else 'model'}); its accuracy is not recorded "
                    "and cannot become the best", runtime)
        # a ranking of NaN logits is no accuracy: only finite evaluations compete for best.safetensors
        finite = [s for s in evaluated if not evaluated[s].num_nonfinite]
        best_source = max(finite, key=lambda s: evaluated[s].top1) if finite else "model"
        best = evaluated[best_source]
        extra = dict(epoch=epoch + 1, val_top1=f"{evaluated['model'].top1:.4f}", weights="model")
        self.save_weights("last.safetensors", self.model, extra)
        if finite and best.top1 > self.state.best_top1:
            self.state.best_top1, self.state.best_epoch = best.top1, epoch
            weights = self.model if best_source == "model" else self.ema.module  # type: ignore[union-attr]
            self.save_weights("best.safetensors", weights,
                              dict(epoch=epoch + 1, val_top1=f"{best.top1:.4f}", weights=best_source))
        row["best_top1"] = self.state.best_top1 if self.state.best_epoch >= 0 else None  # none yet: empty
        self.state.history.append(row)
        self.run_log.epoch(self.state.history)
        ema_note = f" | EMA top-1 {evaluated['ema'].top1:.2f}%" if "ema" in evaluated else ""
        skipped_note = f" | skipped {meter.skipped} train, {best.num_skipped} val images" if (
            meter.skipped or best.num_skipped) else ""
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} "
            f"top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%{ema_note}{skipped_note} | "
            f"{meter.seconds:.1f} s, {row['img_per_s']:.0f} img/s", runtime)
        self.state.epoch, self.state.step, self.state.meter = epoch + 1, 0, EpochMeter()
        self.save_state()

    def _sync_norm_statistics(self) -> None:
        """Average the BatchNorm running statistics over ranks (timm's ``--dist-bn reduce``).

        DDP broadcasts rank 0's buffers before each forward, but each rank's last forward then
        updates its own copy with its own batch; without this, rank k would validate a model that
        differs from the one rank 0 saves, and the sharded val figures would not be the saved
        weights' figures."""
        if not self.runtime.distributed:
            return
        from timm.utils import distribute_bn

        distribute_bn(self.model, self.runtime.world_size, reduce=True)
        if self.ema is not None:
            distribute_bn(self.ema.module, self.runtime.world_size, reduce=True)

    def _evaluate(self, model: nn.Module, desc: str) -> EvalResult:
        return evaluate(model, self.val_loader, self.num_classes, self.runtime, self.amp_dtype,
                        self.cfg.channels_last, progress=self.cfg.progress, desc=desc)


# ---- the run directory (created and locked by .rundir) ---------------------------------------


def write_config(cfg: TrainConfig, runtime: Runtime) -> None:
    """Create the run directory and write the resolved ``config.yaml`` (main process)."""
    out = Path(cfg.output)  # type: ignore[arg-type]
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        header = [
            "biformer train: the resolved configuration of this run. Rerun: biformer train --config config.yaml",
            f"processes: {runtime.world_size}, global batch: {cfg.batch_size * cfg.accum_steps * runtime.world_size}",
        ]
        text = dump_yaml(cfg, header)

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(out / CONFIG_FILE, write)
    barrier(runtime)


__all__ = ["EvalResult", "Trainer", "TrainingDiverged", "evaluate", "write_config"]
