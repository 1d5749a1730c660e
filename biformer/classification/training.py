"""Classification as a task of the shared engine (:mod:`biformer.engine.loop`).

Built from timm's pieces: ``create_model``, ``create_transform``, ``Mixup``, ``create_optimizer_v2``,
``create_scheduler_v2`` (stepped every update) and its losses; the engine keeps the EMA
(``ModelEmaV3``). Written here: the data (see :mod:`.data`: repeated augmentation, unreadable
images replaced and counted), sharded evaluation (:mod:`.engine`) and how its figures read.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint import load_weights, save_model
from ..engine.loop import Engine, EngineConfig, log, run_in_folder, run_task
from ..engine.optim import TimmSchedule
from ..engine.runtime import Runtime, broadcast_object, resolve_amp
from ..errors import UserValueError
from ..models.biformer import CheckpointMismatchError
from . import data as data_lib
from .config import TrainConfig, dump_yaml, resolved_drop_path, resolved_lr
from .engine import data_config, evaluate as evaluate_classifier

__all__ = ["ClassificationTask", "engine_config", "resolve", "train", "train_in"]


class ClassificationTask:
    name = "classification"
    primary = "top1"  # percent; metrics.csv's val_top1, the checkpoints' val_top1 metadata
    resume_command = "biformer train --resume"

    def __init__(self, cfg: TrainConfig, runtime: Runtime, resume: bool = False) -> None:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.cfg, self.runtime, self.resume = cfg, runtime, resume
        self.train_source = data_lib.open_source(cfg.dataset, cfg.data, cfg.train_split)
        self.class_names: List[str] = list(self.train_source.classes)
        if not self.class_names:
            raise UserValueError(f"cannot tell the classes of dataset {cfg.dataset!r}: it names none")
        self.num_classes = len(self.class_names)
        self._warn_about_classes()
        self.val_source = data_lib.open_source(cfg.dataset, cfg.data, cfg.val_split, class_names=self.class_names)
        self.model_kwargs = {"num_classes": self.num_classes, **cfg.model_kwargs}
        self.lr = resolved_lr(cfg, runtime.world_size)
        if self.lr < cfg.min_lr:
            # linear scaling at a small global batch can fall under the recipe's floor
            log(f"warning: lr {self.lr:.3g} is below min_lr {cfg.min_lr:.3g}, so the schedule rises instead of "
                "decaying; lower --min-lr or raise --lr", runtime)
        self.amp_dtype = resolve_amp(cfg.amp, runtime.device)
        mixup_on = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixup: Any = None
        if mixup_on:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                num_classes=self.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        # set by build_model: the preprocessing takes the model's defaults where the config has none
        self.model: Optional[nn.Module] = None
        self.train_samples: Optional[data_lib.ImageSamples] = None
        self.val_samples: Optional[data_lib.ImageSamples] = None
        self._train_loader: Any = None
        self._sampler: Optional[data_lib.TrainBatchSampler] = None
        self._val_loader: Any = None

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

    # ---- model and data

    def build_model(self) -> nn.Module:
        import timm

        import biformer  # noqa: F401  (registers the models with timm)

        cfg = self.cfg
        try:
            model = timm.create_model(cfg.model, drop_path_rate=resolved_drop_path(cfg), **self.model_kwargs)
        except ValueError as e:  # each kwarg passed the config's checks, but together they may not build
            raise UserValueError(f"cannot build {cfg.model} with model_kwargs {cfg.model_kwargs}: {e}") from e
        if cfg.pretrained and not self.resume:
            not_loaded = load_weights(model, cfg.pretrained, cfg.model)
            log(f"initial weights from {cfg.pretrained}" + (f"; fresh: {not_loaded}" if not_loaded else ""),
                self.runtime)
        data_cfg = data_config(cfg, model)
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **data_cfg, "num_classes": self.num_classes}
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.train_samples = data_lib.ImageSamples(
            self.train_source, data_lib.build_transform(cfg, data_cfg, is_training=True), replace_bad=True)
        self.val_samples = data_lib.ImageSamples(
            self.val_source, data_lib.build_transform(cfg, data_cfg, is_training=False), replace_bad=False)
        self.model = model
        return model

    def train_dataset(self) -> data_lib.ImageSamples:
        assert self.train_samples is not None, "build_model() first: the transforms follow the model's defaults"
        return self.train_samples

    def train_batches(self, epoch: int, start_step: int, runtime: Runtime) -> Iterable[data_lib.Batch]:
        """This rank's micro-batches in :class:`~.data.TrainBatchSampler`'s order (repeated augmentation)."""
        cfg = self.cfg
        if self._train_loader is None:
            self._sampler = data_lib.TrainBatchSampler(
                len(self.train_source), cfg.batch_size, world_size=runtime.world_size, rank=runtime.rank,
                accum_steps=cfg.accum_steps, repeats=cfg.aug_repeats, seed=cfg.seed)
            self._train_loader = data_lib.train_loader(self.train_dataset(), self._sampler, cfg.num_workers,
                                                       runtime.device)
        self._sampler.set_epoch(epoch, start_step)  # type: ignore[union-attr]
        return self._train_loader

    def skipped_images(self, batch: data_lib.Batch) -> Sequence[str]:
        return batch.skipped

    def losses(self, model: nn.Module, batch: data_lib.Batch, device: torch.device) -> Dict[str, Tensor]:
        images = batch.images.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        if self.mixup is not None:  # the engine seeded numpy (Mixup's draws) for this update and slot
            images, targets = self.mixup(images, targets)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"loss": self.criterion(model(images), targets)}

    def configure_optimization(self, model: nn.Module, steps_per_epoch: int,
                               world_size: int) -> Tuple[torch.optim.Optimizer, TimmSchedule]:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.cfg
        optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eps=cfg.opt_eps)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        return optimizer, TimmSchedule(scheduler)

    # ---- validation

    def evaluate(self, model: nn.Module, runtime: Runtime) -> Dict[str, float]:
        cfg = self.cfg
        if self._val_loader is None:
            self._val_loader = data_lib.eval_loader(self.val_samples, cfg.batch_size, cfg.num_workers,  # type: ignore[arg-type]
                                                    runtime.device, runtime.world_size, runtime.rank)
        result = evaluate_classifier(model, self._val_loader, self.num_classes, runtime, self.amp_dtype, cfg.channels_last,
                          progress=cfg.progress, desc="val")
        return {"loss": result.loss, "top1": result.top1, "top5": result.top5, "images": result.num_images,
                "skipped": result.num_skipped, "nonfinite": result.num_nonfinite}

    def validation_columns(self, evaluated: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
        """val_loss/top1/top5 per candidate (ema_val_* for the EMA), then the val set's counts once."""
        columns: Dict[str, Any] = {}
        for name, figures in evaluated.items():
            prefix = "" if name == "model" else f"{name}_"
            columns.update({f"{prefix}val_{k}": figures[k] for k in ("loss", "top1", "top5")})
        if "model" in evaluated:
            columns.update(val_images=int(evaluated["model"]["images"]), val_skipped=int(evaluated["model"]["skipped"]))
        return columns

    def unusable(self, figures: Dict[str, float]) -> Optional[str]:
        """A ranking of NaN logits is no accuracy: only finite evaluations compete for best.safetensors."""
        if figures["nonfinite"]:
            return f"{int(figures['nonfinite'])} of {int(figures['images'])} val images gave non-finite logits"
        return None

    def summary(self, evaluated: Dict[str, Dict[str, float]]) -> str:
        model = evaluated["model"]
        text = f"val loss {model['loss']:.4f} top-1 {model['top1']:.2f}% top-5 {model['top5']:.2f}%"
        if "ema" in evaluated:
            text += f" | EMA top-1 {evaluated['ema']['top1']:.2f}%"
        if model["skipped"]:
            text += f" | skipped {int(model['skipped'])} val images"
        return text

    # ---- checkpoints and the run's state

    def save(self, path: Path, model: nn.Module, extra: Dict[str, str]) -> None:
        metadata = {"class_names": json.dumps(self.class_names), **extra}
        save_model(path, model, self.cfg.model, self.model_kwargs, metadata)

    def state_dict(self) -> Dict[str, Any]:
        return {"model_name": self.cfg.model}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("model_name") != self.cfg.model:
            raise CheckpointMismatchError(
                f"the run's {self.cfg.output}/state.pt holds a {state.get('model_name')} run, but the config "
                f"trains {self.cfg.model}")

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0
        return (f"{self.cfg.model} ({n_params / 1e6:.2f}M params, {self.num_classes} classes, preset "
                f"{self.cfg.preset}), {len(self.val_source)} val images")


# ---- a run ---------------------------------------------------------------------------------------


def resolve(cfg: TrainConfig, world_size: int, output: str) -> TrainConfig:
    """Fill the values that depend on the data given and the number of processes, so the saved
    config states exactly what ran."""
    from .config import DIGITS

    if cfg.dataset is None:
        cfg.dataset = DIGITS if cfg.data is None else ""
    cfg.drop_path = resolved_drop_path(cfg)
    cfg.lr = resolved_lr(cfg, world_size)
    if cfg.num_workers is None:
        cfg.num_workers = data_lib.default_num_workers()
    cfg.output = output
    return cfg


def default_output(cfg: TrainConfig) -> str:
    return str(Path("runs") / f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")


def engine_config(cfg: TrainConfig) -> EngineConfig:
    """The engine's settings of a resolved config."""
    return EngineConfig(
        output=Path(cfg.output), epochs=cfg.epochs, batch_size=cfg.batch_size,  # type: ignore[arg-type]
        accum_steps=cfg.accum_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,  # type: ignore[arg-type]
        clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode, amp=cfg.amp,
        ema_decay=cfg.model_ema_decay if cfg.model_ema else None, num_workers=cfg.num_workers,  # type: ignore[arg-type]
        seed=cfg.seed, log_every=cfg.log_interval, save_every=cfg.save_every, eval_every=1,
        progress=cfg.progress, tensorboard=cfg.tensorboard)


def _setup(cfg: TrainConfig, resume: bool) -> Any:
    def setup(runtime: Runtime) -> Tuple[ClassificationTask, EngineConfig, str]:
        resolved = resolve(cfg, runtime.world_size, cfg.output or broadcast_object(default_output(cfg)))
        header = [
            "biformer train: the resolved configuration of this run. Rerun: biformer train --config config.yaml",
            f"processes: {runtime.world_size}, global batch: "
            f"{resolved.batch_size * resolved.accum_steps * runtime.world_size}",
        ]
        return ClassificationTask(resolved, runtime, resume), engine_config(resolved), dump_yaml(resolved, header)

    return setup


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Engine:
    """``biformer train``: ``cfg`` (from :func:`~.config.build_config`) in its own runtime (torchrun's
    processes, or one) and run folder. The returned engine's ``state.history`` holds metrics.csv's rows."""
    return run_task(cfg.device, _setup(cfg, resume), resume, overwrite)


def train_in(runtime: Runtime, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
             note: Any = log) -> Engine:
    """:func:`train` in a runtime the caller holds (the ablation runs several trainings in one process)."""
    return run_in_folder(runtime, _setup(cfg, resume), resume, overwrite, note=note)
