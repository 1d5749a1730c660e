"""Checkpoint files: safe loading, our safetensors format, and conversion of the original's.

:func:`load_checkpoint` is the one loader: every command reads a classifier (ours or the original's)
or a task model through it, and :func:`load_weights` (weights into a model already built) shares its
reader. Either reads the file once.

No path here unpickles code: ``.safetensors`` files are read with safetensors, anything else with
``torch.load(weights_only=True)``, which refuses pickles that would run code.

Our files are safetensors whose metadata names the model and the kwargs that rebuild it::

    {"format": "biformer", "model_name": "biformer_tiny", "model_kwargs": "{\"num_classes\": 10}",
     "pretrained_cfg": "{...mean, std, input_size, crop_pct...}"}
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from .errors import UserError, UserValueError
from .models.biformer import (
    MODEL_ARGS,
    CheckpointMismatchError,
    checkpoint_filter_fn,
    is_original_state_dict,
    unwrap_state_dict,
)

PathLike = Union[str, os.PathLike]
FORMAT = "biformer"
_PREPROCESS_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes")


class CheckpointError(UserValueError):
    """A checkpoint file cannot be read (missing, truncated, not a checkpoint, unsafe, or its
    metadata is malformed or asks for something we do not build)."""


class DiskFullError(UserError):
    """A file could not be written because its file system is full; the previous file is kept."""


# Sentences of torch's load errors that must never reach a user: they suggest weights_only=False,
# which runs whatever code the pickle holds.
_UNSAFE_HINTS = re.compile(r"weights_only.{0,20}False|re-running|in pytorch 2\.6|please file an issue|"
                           r"check the documentation|trusted source", re.IGNORECASE)


def describe_load_error(error: BaseException) -> str:
    """One line from a ``torch.load`` error: the cause, without torch's advice to unpickle unsafely."""
    text = str(error)
    if "WeightsUnpickler error:" in text:  # the specific cause follows this marker
        text = text.split("WeightsUnpickler error:", 1)[1]
    sentences = re.split(r"(?<=[.!?])\s+|\n+", text)
    kept = " ".join(s.strip() for s in sentences if s.strip() and not _UNSAFE_HINTS.search(s))
    return f"{type(error).__name__}: {kept or 'not a readable checkpoint'}"


def read_state_dict(path: PathLike) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Read tensors and metadata from a ``.safetensors`` or ``torch.save`` file, unwrapping
    ``{"model": ...}`` / ``{"state_dict": ...}``. The file is opened once; no pickled code runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if _is_safetensors_header(head):  # a safetensors file under another name
            return _read_safetensors_bytes(path, head + f.read())
        f.seek(0)
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
            raise CheckpointError(
                f"refusing or unable to load {str(path)!r} with weights_only=True ({describe_load_error(e)}); "
                "only plain tensor checkpoints are accepted, and a pickle that needs code is never executed"
            ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, expected a state_dict")
    state_dict = unwrap_state_dict(obj)
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{str(path)!r} has non-tensor entries {bad[:5]}; expected a state_dict")
    return state_dict, {}


def _is_safetensors_header(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header size, then the header's JSON ``{``."""
    return len(head) == 9 and head[8:9] == b"{"


def _safetensors_error(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {error}")


def _read_safetensors(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:  # tensors and metadata from one open
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _safetensors_error(path, e) from e
    return tensors, metadata


def _read_safetensors_bytes(path: Path, data: bytes) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    try:
        tensors = load_safetensors_bytes(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, AttributeError) as e:  # ValueError covers malformed JSON
        raise _safetensors_error(path, e) from e
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, before any threads
    os.umask(umask)
    return umask


_UMASK = _read_umask()


TEMP_SUFFIX = ".tmp"
# Below this many free bytes, a failed write is taken for a full disk: torch.save reports ENOSPC
# as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", without the errno.
_NEARLY_FULL_BYTES = 1 << 20


def temporary_name_pattern(name: str) -> "re.Pattern[str]":
    """The names :func:`atomic_write` gives its temporaries for a file called ``name``."""
    return re.compile(re.escape(f".{name}.") + r"[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX))


def free_bytes(folder: PathLike) -> Optional[int]:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_disk_full(error: BaseException, folder: PathLike) -> bool:
    """Whether ``error`` (raised while writing into ``folder``) means the file system is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    free = free_bytes(folder)
    return free is not None and free < _NEARLY_FULL_BYTES


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``, so no half-written file is ever visible
    and the previous ``path`` stays whole until the new one is complete. A full disk raises
    :class:`DiskFullError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        if is_disk_full(e, path.parent):  # checked before the partial file is removed, which frees space
            previous = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
            raise DiskFullError(f"no space left on device in {str(path.parent)!r} while writing {path.name} "
                                f"({type(e).__name__}: {_first_line(e)}); {previous}") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def preprocess_config(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg}


def save_model(
    path: PathLike,
    model: nn.Module,
    model_name: str,
    model_kwargs: Optional[Dict[str, Any]] = None,
    extra_metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Write ``model``'s weights plus what rebuilds it (name, kwargs, preprocessing) atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_name": model_name,
        "model_kwargs": json.dumps(model_kwargs or {}),
        "pretrained_cfg": json.dumps(preprocess_config(model)),
        **(extra_metadata or {}),
    }
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def infer_original_variant(state_dict: Dict[str, Tensor]) -> str:
    """The registered variant whose every non-classifier tensor shape matches ``state_dict``."""
    import timm

    for name in MODEL_ARGS:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0)
        try:
            checkpoint_filter_fn(state_dict, model)
        except CheckpointMismatchError:
            continue
        return name
    raise CheckpointMismatchError(
        f"the checkpoint matches none of the registered variants {list(MODEL_ARGS)}; pass the model name explicitly"
    )


def _num_classes(state_dict: Dict[str, Tensor]) -> int:
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


# ---- checking what a file's metadata asks us to build ------------------------------------------

# A file's metadata chooses the model and its constructor arguments, so it is checked like any
# user input: only our variants, only these kwargs, each within a range that builds a sane model.
_MAX_PARAMS = 2_000_000_000  # 8 GB of fp32 weights


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and low <= v <= high


def _float_in(low: float, high: float, high_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high)


def _per_stage_of(check: Callable[[Any], bool], allow_none: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        items = v if isinstance(v, (list, tuple)) else [v]
        return len(items) in (1, 4) and all((allow_none and x is None) or check(x) for x in items)
    return ok


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _backend_name(v: Any) -> bool:
    from .ops.bra import available_backends

    return isinstance(v, str) and v in ("auto", *available_backends())


# kwarg -> (check, what is expected)
MODEL_KWARG_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "num_classes": (_int_in(0, 100_000), "an integer in 0..100000"),
    "in_chans": (_int_in(1, 64), "an integer in 1..64"),
    "global_pool": (_one_of("avg", ""), "'avg' or ''"),
    "depths": (_per_stage_of(_int_in(0, 64)), "1 or 4 integers in 0..64"),
    "embed_dims": (_per_stage_of(_int_in(1, 4096)), "1 or 4 integers in 1..4096"),
    "qk_dims": (lambda v: v is None or _per_stage_of(_int_in(1, 4096))(v), "null or 1 or 4 integers in 1..4096"),
    "head_dim": (_int_in(1, 4096), "an integer in 1..4096"),
    "topks": (_per_stage_of(_int_in(1, 4096), allow_none=True), "1 or 4 integers in 1..4096 or null"),
    "n_win": (_int_in(1, 64), "an integer in 1..64"),
    "region_size": (lambda v: v is None or _int_in(1, 1024)(v), "null or an integer in 1..1024"),
    "mlp_ratios": (_per_stage_of(_float_in(0.0, 16.0)), "1 or 4 numbers in 0..16"),
    "side_dwconv": (_int_in(0, 31), "an integer in 0..31"),
    "cpe_kernel": (_int_in(0, 31), "an integer in 0..31"),
    "stem": (_one_of("conv", "patch"), "'conv' or 'patch'"),
    "downsample": (_one_of("conv", "merge"), "'conv' or 'merge'"),
    "norm_eps": (_float_in(0.0, 1.0, high_open=True), "a number in [0, 1)"),
    "drop_rate": (_float_in(0.0, 1.0, high_open=True), "a number in [0, 1)"),
    "drop_path_rate": (_float_in(0.0, 1.0, high_open=True), "a number in [0, 1)"),
    "bra_backend": (_backend_name, "'auto' or a backend of biformer.ops.available_backends()"),
}

# research variants built on BiFormer (e.g. biformer.ablate's skeleton): name -> (base kwargs, extra kwarg rules).
# Registered by the module that defines them, so their checkpoints and configs pass the same checks.
EXTRA_MODELS: Dict[str, Tuple[Dict[str, Any], Dict[str, Tuple[Callable[[Any], bool], str]]]] = {}


def register_model_rules(name: str, base_kwargs: Dict[str, Any],
                         kwarg_rules: Dict[str, Tuple[Callable[[Any], bool], str]]) -> None:
    """Accept ``name`` as a model of our files and configs, with ``kwarg_rules`` on top of the BiFormer ones."""
    EXTRA_MODELS[name] = (dict(base_kwargs), dict(kwarg_rules))


# research variants whose module registers them (with timm and here) on import: imported when a file
# or a config names them, so `biformer eval` reads an ablation run's checkpoint as any other
MODEL_MODULES = {"biformer_ablate": "biformer.ablate.skeleton"}


def _register(model_name: str) -> None:
    if model_name in MODEL_MODULES and model_name not in EXTRA_MODELS:
        import importlib

        importlib.import_module(MODEL_MODULES[model_name])


def accepted_models() -> List[str]:
    return sorted(MODEL_ARGS) + sorted(set(EXTRA_MODELS) | set(MODEL_MODULES))


def kwarg_rules_for(model_name: str) -> Dict[str, Tuple[Callable[[Any], bool], str]]:
    _register(model_name)
    return {**MODEL_KWARG_RULES, **EXTRA_MODELS.get(model_name, ({}, {}))[1]}


_PRETRAINED_CFG_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "input_size": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_int_in(1, 8192)(x) for x in v),
                   "3 integers in 1..8192 (C, H, W)"),
    "crop_pct": (_float_in(0.01, 2.0), "a number in 0.01..2"),
    "interpolation": (_one_of("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random"),
                      "a PIL interpolation name such as 'bicubic'"),
    "mean": (lambda v: isinstance(v, (list, tuple)) and len(v) in (1, 3) and all(_float_in(-10, 10)(x) for x in v),
             "1 or 3 numbers"),
    "std": (lambda v: isinstance(v, (list, tuple)) and len(v) in (1, 3) and all(_float_in(1e-6, 100)(x) for x in v),
            "1 or 3 positive numbers"),
    "num_classes": (_int_in(0, 100_000), "an integer in 0..100000"),
}


def _json_field(path: PathLike, metadata: Dict[str, str], name: str, default: Any) -> Any:
    """``metadata[name]`` parsed as JSON; malformed JSON is a :class:`CheckpointError` naming the file."""
    if name not in metadata:
        return default
    try:
        return json.loads(metadata[name])
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r}: metadata field {name!r} is not valid JSON ({e})") from e


def _estimated_params(kwargs: Dict[str, Any], base: Dict[str, Any]) -> float:
    """A rough parameter count (attention + MLP per block, and the classifier), to refuse a
    model too large to build before allocating it."""
    merged = {**base, **kwargs}

    def stages(name: str, default: Any) -> List[float]:
        v = merged.get(name, default)
        items = list(v) if isinstance(v, (list, tuple)) else [v] * 4
        return [float(x) for x in (items * 4 if len(items) == 1 else items)]

    depths, dims = stages("depths", (2, 2, 8, 2)), stages("embed_dims", (64, 128, 256, 512))
    ratios = stages("mlp_ratios", 3.0)
    blocks = sum(d * (4 + 2 * r) * c * c for d, c, r in zip(depths, dims, ratios))
    return blocks + float(merged.get("num_classes", 1000)) * dims[-1]


def validate_metadata(path: PathLike, metadata: Dict[str, str]) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """``(model_name, model_kwargs, pretrained_cfg)`` from our file's metadata, each checked: only a
    registered BiFormer variant, only known kwargs within sane ranges, no paths or pretrained
    loading. Anything else is a :class:`CheckpointError` naming the field."""
    where = str(path)
    model_name = metadata.get("model_name")
    if not isinstance(model_name, str) or not model_name:
        raise CheckpointError(f"{where!r}: metadata has no 'model_name'; expected one of {accepted_models()}")
    if model_name not in accepted_models():
        raise CheckpointError(f"{where!r}: metadata field 'model_name' is {model_name[:100]!r}, "
                              f"expected one of {accepted_models()}")
    _register(model_name)
    kwargs = _json_field(path, metadata, "model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where!r}: metadata field 'model_kwargs' is a {type(kwargs).__name__}, expected "
                              "a JSON object")
    rules = kwarg_rules_for(model_name)
    for key, value in kwargs.items():
        if key not in rules:
            raise CheckpointError(f"{where!r}: metadata field 'model_kwargs.{key[:100]}' is not accepted; "
                                  f"expected only {sorted(rules)}")
        check, expected = rules[key]
        if not check(value):
            raise CheckpointError(f"{where!r}: metadata field 'model_kwargs.{key}' is {str(value)[:100]}, "
                                  f"expected {expected}")
    params = _estimated_params(kwargs, MODEL_ARGS.get(model_name) or EXTRA_MODELS[model_name][0])
    if params > _MAX_PARAMS:
        raise CheckpointError(f"{where!r}: metadata field 'model_kwargs' describes a model of about "
                              f"{params:.3g} parameters, expected at most {_MAX_PARAMS:.0e}")
    pretrained_cfg = _json_field(path, metadata, "pretrained_cfg", {})
    if not isinstance(pretrained_cfg, dict):
        raise CheckpointError(f"{where!r}: metadata field 'pretrained_cfg' is a {type(pretrained_cfg).__name__}, "
                              "expected a JSON object")
    for key, value in pretrained_cfg.items():
        if key not in _PRETRAINED_CFG_RULES:
            raise CheckpointError(f"{where!r}: metadata field 'pretrained_cfg.{key[:100]}' is not accepted; "
                                  f"expected only {sorted(_PRETRAINED_CFG_RULES)}")
        check, expected = _PRETRAINED_CFG_RULES[key]
        if not check(value):
            raise CheckpointError(f"{where!r}: metadata field 'pretrained_cfg.{key}' is {str(value)[:100]}, "
                                  f"expected {expected}")
    return model_name, kwargs, pretrained_cfg


def class_names_of(path: PathLike, metadata: Dict[str, str]) -> Optional[List[str]]:
    """The checkpoint's class names (None when it names none); malformed ones are a CheckpointError."""
    names = _json_field(path, metadata, "class_names", None)
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{str(path)!r}: metadata field 'class_names' is not a JSON list of strings")
    return names


@dataclass
class LoadedCheckpoint:
    """A model built and loaded from one read of a checkpoint file, and what the file says about it."""

    model: nn.Module
    model_name: str  # the registered variant, or the builder of a task model (e.g. "upernet")
    model_kwargs: Dict[str, Any]
    class_names: Optional[List[str]]  # None when the file names no classes (the original's format)
    metadata: Dict[str, str]  # as stored; empty for the original's format
    path: str  # the local file read (an hf-hub: name resolved to its cached file)
    task: Optional[str] = None  # "detection" or "segmentation" for a task model, None for a classifier

    @property
    def num_classes(self) -> int:
        count = getattr(self.model, "num_classes", None)
        return int(count) if count is not None else len(self.class_names or [])

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """The preprocessing the model was trained with (input_size, crop_pct, interpolation, mean, std)."""
        return preprocess_config(self.model)

    def data_config(self, img_size: Optional[int] = None, crop_pct: Optional[float] = None) -> Dict[str, Any]:
        """timm's resolved data config of a classifier, with ``img_size`` / ``crop_pct`` overriding the saved ones."""
        from timm.data import resolve_data_config

        overrides: Dict[str, Any] = {}
        if img_size is not None:
            overrides["input_size"] = (3, img_size, img_size)
        if crop_pct is not None:
            overrides["crop_pct"] = crop_pct
        return resolve_data_config(pretrained_cfg={**self.model.pretrained_cfg, **overrides})


# what to use instead when a whole task model is given where a classifier is expected
_TASK_COMMANDS = {"detection": "`biformer detect` or biformer.detection.load_detector",
                  "segmentation": "`biformer segment` or biformer.segmentation.load_segmentor"}


def _refuse_task_model(path: str, metadata: Mapping[str, str], expected: str) -> None:
    """A task model's "model_name" is its builder (e.g. "upernet"): say what it is before comparing names."""
    task = metadata.get("task")
    if task:
        use = _TASK_COMMANDS.get(task, "that task's load function")
        builder = metadata.get("model_name", "")[:100]  # the file's text: cut short
        raise CheckpointMismatchError(f"{path!r} is a whole {task[:100]} model ({builder}), not {expected}; "
                                      f"load it with {use} instead")


def read_checkpoint(path: PathLike) -> Tuple[str, Dict[str, Tensor], Dict[str, str]]:
    """``(local path, tensors, metadata)`` of a checkpoint, read once: a local file, or
    ``hf-hub:ORG/NAME[@REV]`` (its ``model.safetensors`` in the Hugging Face cache)."""
    from .hub import resolve_checkpoint

    local = str(resolve_checkpoint(str(path)))
    state_dict, metadata = read_state_dict(local)
    return local, state_dict, metadata


def load_checkpoint(
    path: PathLike,
    model_name: Optional[str] = None,
    *,
    task: Optional[str] = None,
    builders: Optional[Mapping[str, Callable[..., nn.Module]]] = None,
    **overrides: Any,
) -> LoadedCheckpoint:
    """Read a checkpoint once and build the model it holds: every command loads through here.

    Without ``task``: a classifier, from our file (its metadata checked by :func:`validate_metadata`
    before anything is built) or from the original's format (the variant inferred from the tensor
    shapes, the keys converted). ``model_name`` refuses a checkpoint of another model, naming both;
    ``overrides`` are extra model kwargs. With ``task`` (and that task's ``builders``): a whole task
    model saved by :func:`save_task_model`.
    """
    where, state_dict, metadata = read_checkpoint(path)
    if task is not None:
        return _build_task_model(where, state_dict, metadata, task, builders or {})
    _refuse_task_model(where, metadata, "a classification checkpoint")
    ours, asked = metadata.get("format") == FORMAT, model_name
    if ours:
        saved_name, kwargs, pretrained_cfg = validate_metadata(where, metadata)
        if model_name is not None and model_name != saved_name:
            raise CheckpointMismatchError(f"{where!r} holds a {saved_name} checkpoint, but model {model_name} "
                                          "was asked for")
        model_name = saved_name
        class_names = class_names_of(where, metadata)
    else:
        if model_name is None:
            model_name = infer_original_variant(state_dict)
        kwargs, pretrained_cfg, class_names = {"num_classes": _num_classes(state_dict)}, {}, None
    kwargs.update(overrides)
    model = _create_classifier(where, model_name, kwargs, ours)
    try:
        model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    except (CheckpointMismatchError, RuntimeError) as e:
        if not ours and asked is not None:
            _refuse_other_original_variant(where, state_dict, asked)
        raise CheckpointMismatchError(f"{where!r} does not fit model {model_name}: {e}") from e
    if pretrained_cfg:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **pretrained_cfg}
    return LoadedCheckpoint(model, model_name, kwargs, class_names, metadata, where)


def _create_classifier(where: str, model_name: str, kwargs: Dict[str, Any], ours: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, **kwargs)
    except (ValueError, TypeError) as e:  # each kwarg is in range, but together they may not build
        if not ours or isinstance(e, CheckpointMismatchError):
            raise
        raise CheckpointError(f"{where!r}: metadata field 'model_kwargs' does not build {model_name}: {e}") from e


def _refuse_other_original_variant(where: str, state_dict: Dict[str, Tensor], asked: str) -> None:
    """An original-format checkpoint names no model: when it is another variant than ``asked``, say which."""
    try:
        variant = infer_original_variant(state_dict)
    except CheckpointMismatchError:
        return
    if variant != asked:
        raise CheckpointMismatchError(f"{where!r} holds a {variant} checkpoint (original format), so it does not fit "
                                      f"model {asked}")


def _build_task_model(where: str, state_dict: Dict[str, Tensor], metadata: Dict[str, str], task: str,
                      builders: Mapping[str, Callable[..., nn.Module]]) -> LoadedCheckpoint:
    if metadata.get("format") != FORMAT or metadata.get("task") != task:
        found = metadata.get("task") or (
            f"{metadata['model_name']} classification" if "model_name" in metadata else "unknown-format"
        )
        raise CheckpointError(f"{where!r} is a {found} checkpoint, expected a {task} model saved by biformer")
    builder = metadata.get("model_name", "")
    if builder not in builders:
        raise CheckpointError(f"{where!r} was built by {builder[:100]!r}, expected one of {sorted(builders)}")
    kwargs = _json_field(where, metadata, "model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where!r}: metadata field 'model_kwargs' is a {type(kwargs).__name__}, expected "
                              "a JSON object")
    class_names = class_names_of(where, metadata) or []
    try:
        model = builders[builder](**kwargs)
    except TypeError as e:  # a kwarg the builder does not take
        raise CheckpointError(f"{where!r}: metadata field 'model_kwargs' does not build {builder}: {e}") from e
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{where!r} does not fit {builder}(**{kwargs}): {e}") from e
    return LoadedCheckpoint(model, builder, kwargs, class_names, metadata, where, task=task)


def load_model(
    path: PathLike,
    model_name: Optional[str] = None,
    **overrides: Any,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """:func:`load_checkpoint` for a classifier, as ``(model, info)``: ``info`` holds ``model_name``,
    ``model_kwargs``, the preprocessing config (``pretrained_cfg``), ``class_names`` and ``metadata``."""
    loaded = load_checkpoint(path, model_name, **overrides)
    return loaded.model, {"model_name": loaded.model_name, "model_kwargs": loaded.model_kwargs,
                          "pretrained_cfg": loaded.pretrained_cfg, "class_names": loaded.class_names,
                          "metadata": loaded.metadata}


# Metadata that save_model writes itself; everything else in our file (class names, epoch,
# val_top1, ...) is carried over by convert.
_OWN_METADATA = ("format", "model_name", "model_kwargs", "pretrained_cfg")


def convert(src: PathLike, dst: PathLike, model_name: Optional[str] = None) -> str:
    """Convert a checkpoint in the original's format (or ours) to our safetensors file, keeping
    our file's other metadata (class names, epoch, val_top1). Returns the model name."""
    dst = Path(dst)
    if dst.is_dir():
        raise UserValueError(f"got destination {str(dst)!r}, which is a directory; expected a .safetensors file path")
    if dst.exists() and dst.resolve() == Path(src).resolve():
        raise UserValueError(f"got destination {str(dst)!r}, which is the source file; expected another path")
    loaded = load_checkpoint(src, model_name)  # malformed class names are refused here, not copied on
    metadata = loaded.metadata
    extra = {k: v for k, v in metadata.items() if k not in _OWN_METADATA} if metadata.get("format") == FORMAT else {}
    try:
        save_model(dst, loaded.model, loaded.model_name, loaded.model_kwargs, extra)
    except (DiskFullError, IsADirectoryError):
        raise
    except OSError as e:  # a parent that is a file, a read-only or missing mount
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(dst) else ""
        raise UserError(f"cannot write {str(dst)!r}: {e.strerror or e}{where}") from e
    return loaded.model_name


__all__ = [
    "CheckpointError",
    "DiskFullError",
    "LoadedCheckpoint",
    "atomic_write",
    "class_names_of",
    "describe_load_error",
    "validate_metadata",
    "convert",
    "infer_original_variant",
    "is_original_state_dict",
    "load_checkpoint",
    "load_model",
    "load_task_model",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "save_model",
]


_HEAD_KEYS = ("head.weight", "head.bias")


def load_weights(model: nn.Module, path: PathLike, model_name: Optional[str] = None,
                 *, without_head: bool = False) -> List[str]:
    """Load a classification checkpoint (ours or the original's) into a BiFormer ``model``: the one
    path by which a run starts from weights (``train --pretrained``, ``--pretrained-backbone``).

    The file is read once. A whole task model is refused, and so is one of another variant than
    ``model_name``; the original's keys are converted. Tensors whose shape differs from the model's
    (a classifier of another class count) keep their fresh init; ``without_head`` leaves the
    classifier out altogether (a backbone has none). Returns the keys not loaded."""
    where, state_dict, metadata = read_checkpoint(path)
    _refuse_task_model(where, metadata, "a classification checkpoint")
    saved_name = metadata.get("model_name") if metadata.get("format") == FORMAT else None
    if saved_name and model_name and saved_name != model_name:
        raise CheckpointMismatchError(f"{where!r} holds a {saved_name} checkpoint, but the model is {model_name}")
    try:
        state_dict = checkpoint_filter_fn(state_dict, model)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{where!r} does not fit {model_name or 'the model'}: {e}") from e
    if without_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in _HEAD_KEYS}
    own = model.state_dict()
    reshaped = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    for k in reshaped:
        del state_dict[k]
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise CheckpointMismatchError(f"{where!r} has keys {list(unexpected)[:5]} that {model_name or 'the model'} "
                                      "does not")
    return sorted(set(missing) | set(reshaped))


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
    """:func:`load_checkpoint` for a model saved by :func:`save_task_model`, as ``(model, info)``:
    ``info`` holds ``builder``, ``kwargs``, ``class_names`` and the file's other metadata."""
    loaded = load_checkpoint(path, task=task, builders=builders)
    info: Dict[str, Any] = {"builder": loaded.model_name, "kwargs": loaded.model_kwargs,
                            "class_names": loaded.class_names}
    info.update({k: v for k, v in loaded.metadata.items() if k not in ("model_kwargs", "class_names", "model_name")})
    return loaded.model, info
