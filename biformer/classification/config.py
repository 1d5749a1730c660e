"""Training configuration: one dataclass, named presets, YAML files and command-line flags.

Precedence, lowest first: the dataclass defaults (the paper's ImageNet recipe), the preset, the
``--config`` YAML file, then flags given on the command line. Every field is a flag
(``batch_size`` -> ``--batch-size``) and a YAML key (``batch_size`` or ``batch-size``).

The presets differ only in defaults; ``digits`` and ``imagenet`` run the same code.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from ..errors import UserError, UserValueError

DIGITS = "digits"  # the bundled dataset: scikit-learn's handwritten digits, nothing downloaded

# Stochastic depth of the paper's recipe per model (BiFormer-T/S/B); others fall back to 0.1.
DROP_PATH_BY_MODEL = {"biformer_tiny": 0.1, "biformer_small": 0.15, "biformer_base": 0.4}
AMP_MODES = ("auto", "none", "bf16", "fp16")


def _field(default: Any, help: str, group: str, **kwargs: Any) -> Any:
    """A config field; ``help``, ``group``, ``choices`` and ``metavar`` shape its command-line flag."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help, group=group, **kwargs))
    return field(default=default, metadata=dict(help=help, group=group, **kwargs))


@dataclass
class TrainConfig:
    """Every option of ``biformer train``. Defaults are the paper's ImageNet-1k recipe."""

    preset: Optional[str] = _field(
        None, "named defaults: 'imagenet' (the paper's recipe) or 'digits' (the small bundled demo); "
        "default: digits when no data is given, else imagenet", "recipe", choices=("imagenet", DIGITS))

    # ---- data
    data: Optional[str] = _field(
        None, "dataset root: an ImageFolder with train/ and val/ class folders, or the root passed to "
        "--dataset; omit it to train on the bundled digits", "data", metavar="DIR")
    dataset: Optional[str] = _field(
        None, "timm dataset spec (e.g. torch/cifar10, hfds/NAME) or 'digits'; default: a folder when "
        "--data is given, else digits", "data", metavar="SPEC")
    train_split: str = _field("train", "training split (sub-folder name for an ImageFolder)", "data")
    val_split: str = _field("val", "validation split", "data")
    num_workers: Optional[int] = _field(None, "data loading processes per rank (default: min(8, CPUs))", "data")
    img_size: int = _field(224, "input resolution (square)", "data")
    crop_pct: Optional[float] = _field(None, "eval center-crop fraction (default: the model's, 0.875)", "data")
    interpolation: str = _field("bicubic", "resize interpolation", "data")
    mean: Optional[Tuple[float, float, float]] = _field(None, "normalization mean (default: ImageNet)", "data")
    std: Optional[Tuple[float, float, float]] = _field(None, "normalization std (default: ImageNet)", "data")

    # ---- model
    model: str = _field("biformer_tiny", "timm model name (biformer_tiny, _small, _base, _stl)", "model",
                        metavar="NAME")
    model_kwargs: Dict[str, Any] = _field(
        {}, "extra model constructor kwargs as YAML/JSON, e.g. '{depths: [1,1,2,1], n_win: 2}'; stored "
        "in the checkpoint so it rebuilds", "model")
    drop_path: Optional[float] = _field(None, "stochastic depth rate (default: 0.1/0.15/0.4 for T/S/B)", "model")
    pretrained: Optional[str] = _field(
        None, "initial weights: our .safetensors or an original checkpoint (classifier dropped when the "
        "class count differs)", "model", metavar="CKPT")
    channels_last: bool = _field(False, "channels_last memory format", "model")
    grad_checkpointing: bool = _field(False, "activation checkpointing (less memory, more compute)", "model")

    # ---- optimization
    epochs: int = _field(300, "training epochs", "optimization")
    batch_size: int = _field(128, "images per process per step (global batch = this x processes x accum_steps)",
                             "optimization")
    accum_steps: int = _field(1, "gradient accumulation steps per optimizer update", "optimization")
    opt: str = _field("adamw", "timm optimizer name", "optimization", metavar="NAME")
    lr: Optional[float] = _field(None, "learning rate (default: lr_base x global batch / lr_base_size)",
                                 "optimization")
    lr_base: float = _field(5e-4, "learning rate at the reference batch lr_base_size", "optimization")
    lr_base_size: int = _field(512, "reference global batch for lr_base (linear scaling)", "optimization")
    weight_decay: float = _field(0.05, "weight decay (not applied to norms and biases)", "optimization")
    opt_eps: float = _field(1e-8, "optimizer epsilon", "optimization")
    momentum: float = _field(0.9, "momentum (SGD-like optimizers)", "optimization")
    clip_grad: Optional[float] = _field(None, "gradient clipping threshold (off when unset)", "optimization")
    clip_mode: str = _field("norm", "gradient clipping mode: norm, value or agc", "optimization",
                            choices=("norm", "value", "agc"))
    sched: str = _field("cosine", "timm scheduler name, stepped every update", "optimization",
                       metavar="NAME")
    warmup_epochs: float = _field(5, "linear warm-up epochs", "optimization")
    warmup_lr: float = _field(1e-6, "learning rate at the start of warm-up", "optimization")
    min_lr: float = _field(1e-5, "learning rate at the end of the schedule", "optimization")

    # ---- augmentation and regularization
    aa: Optional[str] = _field("rand-m9-mstd0.5-inc1", "timm auto-augment policy ('none': off)", "augmentation",
                               metavar="POLICY")
    scale: Tuple[float, float] = _field((0.08, 1.0), "random-resized-crop area range", "augmentation")
    ratio: Tuple[float, float] = _field((3 / 4, 4 / 3), "random-resized-crop aspect range", "augmentation")
    hflip: float = _field(0.5, "horizontal flip probability", "augmentation")
    vflip: float = _field(0.0, "vertical flip probability", "augmentation")
    color_jitter: float = _field(0.4, "color jitter strength (timm skips it under RandAugment)", "augmentation")
    reprob: float = _field(0.25, "random erasing probability", "augmentation")
    remode: str = _field("pixel", "random erasing fill mode", "augmentation")
    recount: int = _field(1, "random erasing count", "augmentation")
    mixup: float = _field(0.8, "mixup alpha (0: off)", "augmentation")
    cutmix: float = _field(1.0, "cutmix alpha (0: off)", "augmentation")
    mixup_prob: float = _field(1.0, "probability of applying mixup or cutmix to a batch", "augmentation")
    mixup_switch_prob: float = _field(0.5, "probability of cutmix instead of mixup when both are on", "augmentation")
    mixup_mode: str = _field("batch", "mixup granularity: batch, pair or elem", "augmentation",
                             choices=("batch", "pair", "elem"))
    smoothing: float = _field(0.1, "label smoothing", "augmentation")
    aug_repeats: int = _field(3, "repeated augmentation: copies of each image per epoch (0: off)", "augmentation")
    model_ema: bool = _field(True, "keep an exponential moving average of the weights", "augmentation")
    model_ema_decay: float = _field(0.99996, "EMA decay per update", "augmentation")

    # ---- runtime
    device: str = _field("auto", "cpu, cuda, cuda:N or auto (the local GPU when there is one)", "runtime",
                         metavar="DEVICE")
    amp: str = _field("auto", "mixed precision: auto (bf16 on a GPU that has it, else fp16 on GPU, none on "
                      "CPU), none, bf16 or fp16", "runtime", choices=AMP_MODES)
    seed: int = _field(0, "random seed; with it every draw (order, augmentation, mixup) is reproducible", "runtime")
    output: Optional[str] = _field(None, "run directory (default: runs/<preset>-<model>-<time>)", "runtime",
                                    metavar="DIR")
    save_every: int = _field(0, "also checkpoint every N optimizer updates (0: only at the end of each epoch)",
                             "runtime")
    log_interval: int = _field(50, "updates between loss log lines (steps.csv, TensorBoard)", "runtime")
    progress: bool = _field(True, "progress bars", "runtime")
    tensorboard: bool = _field(True, "write TensorBoard events to <output>/tb", "runtime")


CONFIG_FIELDS: Dict[str, dataclasses.Field] = {f.name: f for f in fields(TrainConfig)}
_TYPES: Dict[str, Any] = typing.get_type_hints(TrainConfig)

# The paper's recipe is the dataclass defaults; a preset lists only what it changes.
PRESETS: Dict[str, Dict[str, Any]] = {
    "imagenet": {},
    DIGITS: dict(
        # 8x8 grey digits upsampled to 32 px: the stem's stride 4 gives one token per original pixel.
        img_size=32,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        model_kwargs=dict(depths=[1, 1, 2, 1], embed_dims=[32, 64, 128, 256], n_win=2, topks=[2, 2, 2, None]),
        drop_path=0.0,
        epochs=20,
        batch_size=64,
        lr_base=8e-3,  # 1e-3 at the global batch of 64
        warmup_epochs=1,
        min_lr=1e-5,
        # digits keep their orientation and grey levels: mild crops only
        aa=None,
        scale=(0.8, 1.0),
        ratio=(0.9, 1.1),
        hflip=0.0,
        color_jitter=0.0,
        reprob=0.0,
        mixup=0.0,
        cutmix=0.0,
        aug_repeats=0,
        model_ema=False,
        num_workers=0,
        log_interval=10,
    ),
}


def default_preset(values: Mapping[str, Any]) -> str:
    no_data = values.get("data") is None and values.get("dataset") in (None, DIGITS)
    return DIGITS if no_data else "imagenet"


# ---- parsing values --------------------------------------------------------------------------


def _strip_optional(tp: Any) -> Tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def coerce(name: str, value: Any) -> Any:
    """Check and convert ``value`` (from YAML or a flag) to the type of field ``name``."""
    tp, optional = _strip_optional(_TYPES[name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserValueError(f"got {name}=None, but {name} needs a value")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if tp is not str and isinstance(value, bool):
                raise ValueError
            return tp(value)
        if origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
            items = tuple(float(v) for v in value)
            if len(items) != len(typing.get_args(tp)):
                raise ValueError
            return items
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        raise TypeError(f"field {name} has an unsupported type {tp}")
    raise UserValueError(f"got {name}={value!r}, expected {_describe_type(tp)}")


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"{len(typing.get_args(tp))} numbers"
    if typing.get_origin(tp) is dict:
        return "a mapping, e.g. '{depths: [1, 1, 2, 1]}'"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _canonical_key(key: str) -> str:
    name = key.replace("-", "_")
    if name not in CONFIG_FIELDS:
        close = difflib.get_close_matches(name, CONFIG_FIELDS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserValueError(f"unknown config option {key!r}{hint}")
    return name


def load_yaml(path: os.PathLike | str) -> Dict[str, Any]:
    """Read a config file: a flat mapping of option names to values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no config file at {str(path)!r}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:  # the parser's message spans lines: keep the problem and its position
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserValueError(f"{str(path)!r} is not valid YAML: {problem}{where}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {str(path)!r}: {e}") from e
    if not isinstance(raw, Mapping):
        raise UserValueError(f"{str(path)!r} must hold a mapping of option: value, got a {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = _canonical_key(str(key))
        out[name] = coerce(name, value)
    return out


def build_config(overrides: Mapping[str, Any], config_file: Optional[str] = None,
                 base: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Merge defaults < preset < ``base`` (a saved run's config) < ``config_file`` < ``overrides``."""
    file_values = load_yaml(config_file) if config_file else {}
    explicit = {**(base or {}), **file_values, **{k: coerce(_canonical_key(k), v) for k, v in overrides.items()}}
    preset = explicit.get("preset") or default_preset(explicit)
    if preset not in PRESETS:
        raise UserValueError(f"got preset={preset!r}, expected one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], **explicit, "preset": preset}
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    positive = ("epochs", "batch_size", "accum_steps", "img_size", "lr_base_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserValueError(f"got {name}={getattr(cfg, name)}, expected a positive integer")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip", "vflip"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserValueError(f"got {name}={getattr(cfg, name)}, expected a probability in [0, 1]")
    if not 0.0 <= cfg.smoothing < 1.0:
        raise UserValueError(f"got smoothing={cfg.smoothing}, expected a value in [0, 1)")
    if cfg.amp not in AMP_MODES:
        raise UserValueError(f"got amp={cfg.amp!r}, expected one of {AMP_MODES}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UserValueError(f"got batch_size={cfg.batch_size}; mixup/cutmix pair images and need an even batch size")
    if cfg.warmup_epochs > cfg.epochs:
        raise UserValueError(f"got warmup_epochs={cfg.warmup_epochs} > epochs={cfg.epochs}")
    # NaN and inf pass here on purpose: a run that cannot train stops at the first non-finite loss
    for name in ("lr", "lr_base", "opt_eps", "clip_grad", "crop_pct"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserValueError(f"got {name}={value}, expected a positive number")
    for name in ("weight_decay", "warmup_lr", "min_lr", "momentum", "warmup_epochs", "mixup", "cutmix",
                 "color_jitter"):
        if getattr(cfg, name) < 0:
            raise UserValueError(f"got {name}={getattr(cfg, name)}, expected a number >= 0")
    if cfg.drop_path is not None and not 0.0 <= cfg.drop_path < 1.0:
        raise UserValueError(f"got drop_path={cfg.drop_path}, expected a value in [0, 1)")
    if not 0.0 <= cfg.model_ema_decay <= 1.0:
        raise UserValueError(f"got model_ema_decay={cfg.model_ema_decay}, expected a value in [0, 1]")
    if not 0.0 < cfg.scale[0] <= cfg.scale[1] <= 1.0:
        raise UserValueError(f"got scale={list(cfg.scale)}, expected 0 < min <= max <= 1")
    if not 0.0 < cfg.ratio[0] <= cfg.ratio[1]:
        raise UserValueError(f"got ratio={list(cfg.ratio)}, expected 0 < min <= max")
    for name in ("aug_repeats", "save_every", "recount"):
        if getattr(cfg, name) < 0:
            raise UserValueError(f"got {name}={getattr(cfg, name)}, expected an integer >= 0")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise UserValueError(f"got num_workers={cfg.num_workers}, expected an integer >= 0")
    if cfg.log_interval < 1:
        raise UserValueError(f"got log_interval={cfg.log_interval}, expected a positive integer")
    if cfg.model not in _registered_models():
        raise UserValueError(f"got model={cfg.model!r}, expected one of the BiFormer variants {_registered_models()}")
    # what is trained must load again: the same rules as a checkpoint's metadata
    from ..checkpoint import kwarg_rules_for

    rules = kwarg_rules_for(cfg.model)
    for key, value in cfg.model_kwargs.items():
        if key not in rules:
            raise UserValueError(f"got model_kwargs.{key}, expected only {sorted(rules)}")
        check, expected = rules[key]
        if not check(value):
            raise UserValueError(f"got model_kwargs.{key}={value!r}, expected {expected}")


def _registered_models() -> List[str]:
    from ..checkpoint import accepted_models

    return accepted_models()


def resolved_drop_path(cfg: TrainConfig) -> float:
    return cfg.drop_path if cfg.drop_path is not None else DROP_PATH_BY_MODEL.get(cfg.model, 0.1)


def resolved_lr(cfg: TrainConfig, world_size: int) -> float:
    global_batch = cfg.batch_size * cfg.accum_steps * world_size
    return cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / cfg.lr_base_size


def to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """Plain YAML-safe values (tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)}


def dump_yaml(cfg: TrainConfig, header: Iterable[str] = ()) -> str:
    comments = "".join(f"# {line}\n" for line in header)
    return comments + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


# ---- command line ----------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """One flag per field. Flags default to "not given", so a YAML file or preset value stays."""
    groups: Dict[str, argparse._ArgumentGroup] = {}
    skip = set(skip)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        group = groups[group_name]
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _strip_optional(_TYPES[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        digits_default = PRESETS[DIGITS].get(f.name, default)
        # where the presets differ, show both; a None default is explained by the help text itself
        if digits_default != default:
            none = "none" if f.name in _NONE_MEANS_OFF else "auto"
            help_ = (f"{f.metadata['help']} [imagenet: {_show(default, none)}, "
                     f"digits: {_show(digits_default, none)}]")
        elif default is not None:
            help_ = f"{f.metadata['help']} [default: {_show(default)}]"
        else:
            help_ = f.metadata["help"]
        kwargs: Dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_.replace("%", "%%"), dest=f.name)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is tuple:
            group.add_argument(flag, nargs=len(typing.get_args(tp)), metavar="X", **kwargs)
        else:
            metavar = f.metadata.get("metavar") or (None if "choices" in f.metadata else _metavar(tp))
            group.add_argument(flag, metavar=metavar, **kwargs)


# Options whose None turns a feature off; for the others None means "derived" (see their help).
_NONE_MEANS_OFF = frozenset({"aa", "clip_grad", "pretrained"})


def _show(value: Any, none: str = "none") -> str:
    """A default as one would type it on the command line."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value)
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def _metavar(tp: Any) -> str:
    return {int: "N", float: "X", str: "STR"}.get(tp, "YAML")


def explicit_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The config fields given on the command line (flags default to argparse.SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS}


__all__ = [
    "DIGITS",
    "PRESETS",
    "TrainConfig",
    "add_config_arguments",
    "build_config",
    "dump_yaml",
    "explicit_overrides",
    "load_yaml",
    "resolved_drop_path",
    "resolved_lr",
    "to_dict",
]
