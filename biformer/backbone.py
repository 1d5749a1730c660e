"""BiFormer as a dense-prediction backbone (detection, segmentation), and the plumbing those tasks share.

:class:`BiFormerBackbone` follows the original's dense-prediction wrapper: the classifier head and
the final BatchNorm are dropped, and each output stage gets its own LayerNorm over channels. It
returns four NCHW maps at strides 4, 8, 16 and 32 for any input size (the routed attention pads
and masks maps that its region grid does not divide).

The region grid is a per-task setting, as in the paper: ``n_win=7`` for 224^2 classification,
``n_win=8`` for 512^2 segmentation and ``n_win=16`` for ~800x1333 detection. Weights are not tied to
``n_win``, so a classification checkpoint loads into any of them.

The second half of this file holds what :mod:`biformer.detection` and :mod:`biformer.segmentation`
both need: input images (files or scikit-image's bundled photos), devices, AdamW parameter groups,
the paper's learning-rate schedules, a step loop with resumable state, and checkpoints of whole
task models.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from torch import Tensor

from .errors import UserFileNotFoundError, UserValueError
from .checkpoint import FORMAT, CheckpointError, atomic_write, read_state_dict, save_model
from .models.biformer import MODEL_ARGS, BiFormer, CheckpointMismatchError, checkpoint_filter_fn

PathLike = Union[str, os.PathLike]

__all__ = [
    "BiFormerBackbone",
    "load_classification_weights",
    "load_image",
    "SAMPLE_IMAGES",
    "resolve_device",
    "class_colors",
    "label_font_path",
    "build_optimizer",
    "LRSchedule",
    "TrainLoop",
    "save_task_model",
    "load_task_model",
]

STRIDES = (4, 8, 16, 32)
_HEAD_KEYS = ("head.weight", "head.bias")


def load_classification_weights(model: BiFormer, path: PathLike, model_name: Optional[str] = None) -> None:
    """Load a classification checkpoint (ours or the original's) into ``model``, classifier excluded.

    ``model_name``, when given, must match the name stored in one of our checkpoints.
    """
    state_dict, metadata = read_state_dict(path)
    # a task model's "model_name" is its builder (e.g. "upernet"), so say what it is before comparing names
    if "task" in metadata:
        raise CheckpointMismatchError(
            f"{str(path)!r} is a whole {metadata['task']} model ({metadata.get('model_name')}), not a "
            "classification checkpoint; load it with that task's load function instead"
        )
    saved_name = metadata.get("model_name") if metadata.get("format") == FORMAT else None
    if saved_name and model_name and saved_name != model_name:
        raise CheckpointMismatchError(
            f"{str(path)!r} holds a {saved_name} checkpoint, but the backbone is {model_name}"
        )
    try:
        state_dict = checkpoint_filter_fn(state_dict, model)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{str(path)!r} does not fit backbone {model_name or ''}: {e}") from e
    state_dict = {k: v for k, v in state_dict.items() if k not in _HEAD_KEYS}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # the model is built without a classifier; anything else missing was already reported above
    leftover = [k for k in missing if k not in _HEAD_KEYS] + list(unexpected)
    if leftover:
        raise CheckpointMismatchError(f"{str(path)!r} does not fit: {leftover[:8]}")


class BiFormerBackbone(nn.Module):
    """BiFormer feature extractor: ``(N, 3, H, W)`` -> four maps ``(N, C_i, ceil(H/s), ceil(W/s))``, s = 4, 8, 16, 32.

    Args:
        model_name: a registered variant (``biformer_tiny``, ``biformer_small``, ``biformer_base``, ``biformer_stl``).
        n_win: regions per side of the routed attention (paper: 8 for 512^2 segmentation, 16 for detection).
        pretrained: a classification checkpoint to start from (ours or the original's format).
        out_indices: which stages to return (default all four).
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) while training.
        frozen_stages: -1 trains everything; 0 freezes the stem; k >= 1 freezes the stem and stages 0..k-1
            (with their output norms). Frozen parts stay in eval mode.
        drop_path_rate: stochastic depth of the blocks.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        **model_kwargs: any other :class:`biformer.BiFormer` argument (``depths``, ``embed_dims``, ``topks``,
            ``region_size``, ``bra_backend``, ...).

    Outputs carry the original's per-output ``LayerNorm2d`` (``extra_norms.{i}``); the classifier
    head and the final BatchNorm are not part of this module.
    """

    def __init__(
        self,
        model_name: str = "biformer_small",
        *,
        n_win: int = 7,
        pretrained: Optional[PathLike] = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        norm_eval: bool = False,
        frozen_stages: int = -1,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if model_name not in MODEL_ARGS:
            raise UserValueError(f"got model_name={model_name!r}, expected one of {sorted(MODEL_ARGS)}")
        out_indices = tuple(sorted(set(out_indices)))
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise UserValueError(f"got out_indices={out_indices}, expected a non-empty subset of (0, 1, 2, 3)")
        if not -1 <= frozen_stages <= 4:
            raise UserValueError(f"got frozen_stages={frozen_stages}, expected -1 (none) to 4 (all)")
        import timm

        model: BiFormer = timm.create_model(
            model_name, num_classes=0, n_win=n_win, drop_path_rate=drop_path_rate, **model_kwargs
        )
        _check_topk_fits(model)
        if pretrained is not None:
            load_classification_weights(model, pretrained, model_name)
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.model_name = model_name
        self.n_win = n_win
        self.stem = model.stem
        self.stages = model.stages
        self.out_indices = out_indices
        channels = [info["num_chs"] for info in model.feature_info]
        # index-aligned with the stages, as in the original (``extra_norms.{i}``); unused outputs get none
        self.extra_norms = nn.ModuleList(
            [LayerNorm2d(c) if i in out_indices else nn.Identity() for i, c in enumerate(channels)]
        )
        self.out_channels: List[int] = [channels[i] for i in out_indices]
        self.strides: List[int] = [STRIDES[i] for i in out_indices]
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self._freeze()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: List[nn.Module] = [self.stem]
        for i in range(self.frozen_stages):
            modules += [self.stages[i], self.extra_norms[i]]
        return modules

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "BiFormerBackbone":
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: Tensor) -> List[Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(x.shape)}")
        outs = []
        x = self.stem(x)  # (N, 3, H, W) -> (N, C0, H/4, W/4)
        for i, stage in enumerate(self.stages[: self.out_indices[-1] + 1]):
            x = stage(x)  # -> (N, C_i, H/2^(i+2), W/2^(i+2))
            if i in self.out_indices:
                outs.append(self.extra_norms[i](x))
        return outs

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, n_win={self.n_win}, out_indices={self.out_indices}, "
                f"norm_eval={self.norm_eval}, frozen_stages={self.frozen_stages}")


def _check_topk_fits(model: nn.Module) -> None:
    """Each routed stage must have at least ``topk`` regions (``n_win ** 2``); say so at build time."""
    from .layers import BiLevelRoutingAttention

    for name, m in model.named_modules():
        if isinstance(m, BiLevelRoutingAttention) and m.n_win is not None:
            rows, cols = (m.n_win, m.n_win) if isinstance(m.n_win, int) else m.n_win
            if m.topk > rows * cols:
                raise UserValueError(
                    f"got n_win={m.n_win}: {name} routes to topk={m.topk} regions but the grid has only "
                    f"{rows * cols}; use n_win >= {math.ceil(math.sqrt(m.topk))} or smaller topks"
                )


# ================================================================================================
# plumbing shared by biformer.detection and biformer.segmentation
# ================================================================================================

# scikit-image's bundled photos (no download needed), usable wherever a command takes IMAGE
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry")


def load_image(source: PathLike) -> "Image.Image":  # noqa: F821  (PIL, imported lazily)
    """An RGB PIL image from a file, or from one of scikit-image's bundled photos by name (``astronaut``)."""
    from PIL import Image

    from .images import ImageNotFound, open_rgb, to_rgb8

    path = Path(source)
    if path.is_file():
        return open_rgb(path)
    if str(source) in SAMPLE_IMAGES:
        import skimage.data

        array = getattr(skimage.data, str(source))()
        return to_rgb8(Image.fromarray(array))
    raise ImageNotFound(
        f"no image file at {str(source)!r}, and it is not one of scikit-image's sample names {SAMPLE_IMAGES}"
    )


def class_colors(num: int) -> List[Tuple[int, int, int]]:
    """``num`` distinct, stable RGB colours (class ``i`` always gets the same one)."""
    import colorsys

    # golden-ratio hue steps keep neighbouring class indices far apart in hue
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75 if i % 2 else 0.95, 0.95))
        for i in range(num)
    ]  # type: ignore[misc]


def label_font_path() -> str:
    """A TrueType font that is always present (matplotlib ships DejaVu Sans)."""
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserValueError(f"got device={name!r}, but CUDA is not available here; use --device cpu")
    return device


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


def save_task_model(
    path: PathLike,
    model: nn.Module,
    task: str,
    class_names: Sequence[str],
    extra_metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Save a model built by a task builder (it carries ``build_config``) so that :func:`load_task_model` rebuilds it."""
    config = getattr(model, "build_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no build_config; build it with a biformer.{task} builder")
    save_model(
        path,
        model,
        config["builder"],
        config["kwargs"],
        extra_metadata={"task": task, "class_names": json.dumps(list(class_names)), **(extra_metadata or {})},
    )


def load_task_model(
    path: PathLike, task: str, builders: Mapping[str, Callable[..., nn.Module]]
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild and load a model saved by :func:`save_task_model`; returns ``(model, metadata)``."""
    state_dict, metadata = read_state_dict(path)
    if metadata.get("format") != FORMAT or metadata.get("task") != task:
        found = metadata.get("task") or (
            f"{metadata['model_name']} classification" if "model_name" in metadata else "unknown-format"
        )
        raise CheckpointError(f"{str(path)!r} is a {found} checkpoint, expected a {task} model saved by biformer")
    builder = metadata["model_name"]
    if builder not in builders:
        raise CheckpointError(f"{str(path)!r} was built by {builder!r}, expected one of {sorted(builders)}")
    kwargs = json.loads(metadata.get("model_kwargs", "{}"))
    model = builders[builder](**kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{str(path)!r} does not fit {builder}(**{kwargs}): {e}") from e
    info = {"builder": builder, "kwargs": kwargs, "class_names": json.loads(metadata.get("class_names", "[]"))}
    info.update({k: v for k, v in metadata.items() if k not in ("model_kwargs", "class_names", "model_name")})
    return model, info
