"""Sharing models on the Hugging Face Hub in timm's layout, and loading them back.

A shared folder holds what ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` reads:

* ``config.json``: the architecture (a registered ``biformer_*`` name), its kwargs (``model_args``),
  ``num_classes``, ``label_names`` and the preprocessing (``pretrained_cfg``), written by timm;
* ``model.safetensors``: the weights; its metadata is our checkpoint's (model name, kwargs, class
  names), so ``biformer eval/predict --checkpoint hf-hub:ORG/NAME`` reads it like a local file;
* ``README.md``: a model card generated from the training run (data, recipe, metrics, figures).

Loading needs ``import biformer`` first: that is what registers the architecture with timm.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from .errors import UserError

if TYPE_CHECKING:  # torch loads when a function runs, so `biformer push-to-hub --help` answers at once
    import torch.nn as nn

PathLike = Union[str, os.PathLike]
HF_PREFIX = "hf-hub:"
WEIGHTS_NAME = "model.safetensors"
_RUN_WEIGHTS = ("best.safetensors", "last.safetensors")  # what `biformer train` leaves in its run folder
_RUN_FIGURES = ("curves.png", "routing.png", "frequency.png")  # copied into the card when the run has them

__all__ = ["HF_PREFIX", "push_to_hub", "resolve_checkpoint", "save_pretrained", "save_run_pretrained"]


# ---- loading --------------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> str:
    """A local checkpoint path as given; ``hf-hub:ORG/NAME[@REV]`` as its ``model.safetensors`` in the
    Hugging Face cache (downloaded unless ``HF_HUB_OFFLINE=1``, when it must already be cached)."""
    if not str(path).startswith(HF_PREFIX):
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = str(path)[len(HF_PREFIX):].partition("@")
    try:
        return hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision or None)
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError) as e:
        raise UserError(f"cannot get {WEIGHTS_NAME} of {path!r}: {str(e).splitlines()[0]}") from e


# ---- saving ---------------------------------------------------------------------------------


def save_pretrained(
    model: nn.Module,
    directory: PathLike,
    *,
    model_name: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    class_names: Optional[Sequence[str]] = None,
    model_card: Optional[str] = None,
    files: Sequence[PathLike] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hub-ready folder in timm's layout (``config.json``, ``model.safetensors``,
    ``README.md``), so that ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` rebuilds it.

    ``model_name`` and ``model_kwargs`` default to what timm recorded when it built the model.
    ``files`` are copied beside (figures the card links to). The folder appears complete or not at
    all; an existing non-empty ``directory`` is refused unless ``overwrite=True``.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"got directory={str(directory)!r}, which is a file; expected a folder to write")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise UserError(f"{str(directory)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    model_name = model_name or _architecture(model)
    if model_kwargs is None:
        model_kwargs = dict(getattr(model, "_model_args", {}))
    model_kwargs = {**model_kwargs, "num_classes": int(getattr(model, "num_classes"))}
    if class_names is not None and len(class_names) != model_kwargs["num_classes"]:
        raise UserError(f"got {len(class_names)} class names for a model with {model_kwargs['num_classes']} classes")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        _write_folder(staging, model, model_name, model_kwargs, class_names, model_card, files)
        _replace_dir(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _architecture(model: nn.Module) -> str:
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise UserError(f"cannot tell the architecture of this {type(model).__name__}; pass model_name=")
    return str(name)


def _write_folder(out: Path, model: nn.Module, model_name: str, model_kwargs: Dict[str, Any],
                  class_names: Optional[Sequence[str]], model_card: Optional[str], files: Sequence[PathLike]) -> None:
    from timm.models import save_for_hf

    from .checkpoint import preprocess_config, save_model

    model_config: Dict[str, Any] = {"architecture": model_name}
    if class_names is not None:
        model_config["label_names"] = list(class_names)
    # timm writes config.json in its own layout: architecture, model_args, num_classes, label_names, pretrained_cfg
    # tag and pool size describe timm's default (ImageNet, 224) weights, not these
    pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "architecture": model_name, "tag": None, "pool_size": None}
    data_config = {k: v for k, v in preprocess_config(model).items() if k != "num_classes"}
    _with_pretrained_cfg(model, pretrained_cfg,
                         lambda: save_for_hf(model, str(out), model_args=_json_kwargs(model_kwargs),
                                             model_config={k: v for k, v in model_config.items() if k != "architecture"},
                                             safe_serialization=True, data_config=data_config))
    # same tensors, plus our metadata, so biformer's own loader reads the file too
    extra = {"class_names": json.dumps(list(class_names))} if class_names is not None else {}
    save_model(out / WEIGHTS_NAME, model, model_name, model_kwargs, extra)
    for file in files:
        shutil.copy2(file, out / Path(file).name)
    card = model_card if model_card is not None else make_model_card(model_name, model_kwargs, class_names)
    (out / "README.md").write_text(card, encoding="utf-8")


def _with_pretrained_cfg(model: nn.Module, cfg: Dict[str, Any], write: Any) -> None:
    """Run ``write()`` with ``model.pretrained_cfg`` naming the architecture, then restore it."""
    had = hasattr(model, "pretrained_cfg")
    old = getattr(model, "pretrained_cfg", None)
    model.pretrained_cfg = cfg
    try:
        write()
    finally:
        if had:
            model.pretrained_cfg = old
        else:
            del model.pretrained_cfg


def _json_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return json.loads(json.dumps(kwargs))  # tuples -> lists, and a clear error for anything else
    except TypeError as e:
        raise UserError(f"model kwargs {kwargs!r} cannot be written to config.json: {e}") from e


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``; an old ``target`` is removed only once it is replaced."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)  # put the user's folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- runs and model cards -------------------------------------------------------------------


def _run_weights(source: Path) -> Path:
    if source.is_file():
        return source
    if source.is_dir():
        for name in _RUN_WEIGHTS:
            if (source / name).is_file():
                return source / name
        raise UserError(f"{str(source)!r} is a folder without {' or '.join(_RUN_WEIGHTS)}; expected a training run")
    raise UserError(f"got {str(source)!r}, which is neither a checkpoint file nor a training run folder")


def save_run_pretrained(source: PathLike, directory: PathLike, *, repo_id: str = "ORG/NAME",
                        overwrite: bool = False) -> Path:
    """:func:`save_pretrained` for a training run folder (its ``best.safetensors``) or a checkpoint file,
    with a model card from the run's ``config.yaml``, ``metrics.csv`` and figures."""
    from .checkpoint import load_checkpoint

    weights = _run_weights(Path(source))
    loaded = load_checkpoint(weights)  # one read: the model, its class names and the run's metadata
    run = weights.parent if Path(source).is_dir() or (weights.parent / "config.yaml").is_file() else None
    figures = [run / name for name in _RUN_FIGURES if run is not None and (run / name).is_file()]
    card = make_model_card(loaded.model_name, loaded.model_kwargs, loaded.class_names, run=run, weights=weights,
                           metadata=loaded.metadata, figures=[f.name for f in figures], repo_id=repo_id)
    return save_pretrained(loaded.model, directory, model_name=loaded.model_name, model_kwargs=loaded.model_kwargs,
                           class_names=loaded.class_names, model_card=card, files=figures, overwrite=overwrite)


def make_model_card(
    model_name: str,
    model_kwargs: Dict[str, Any],
    class_names: Optional[Sequence[str]],
    *,
    run: Optional[Path] = None,
    weights: Optional[Path] = None,
    metadata: Optional[Dict[str, str]] = None,
    figures: Sequence[str] = (),
    repo_id: str = "ORG/NAME",
) -> str:
    """The README.md of a shared model: what it is, how to load it, and the run that made it."""
    metadata = metadata or {}
    lines = [
        "---",
        "library_name: timm",
        "license: mit",
        "pipeline_tag: image-classification",
        "tags: [image-classification, timm, biformer]",
        "---",
        "",
        f"# {model_name}" + (f" ({len(class_names)} classes)" if class_names else ""),
        "",
        "BiFormer (Vision Transformer with Bi-Level Routing Attention, Zhu et al., CVPR 2023, arXiv:2303.08810),",
        "saved by the `biformer` package in timm's layout.",
        "",
        "## Use",
        "",
        "`import biformer` first: it registers the architecture with timm.",
        "",
        "```python",
        "import biformer, timm",
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()',
        "```",
        "",
        "```bash",
        f"biformer predict --checkpoint hf-hub:{repo_id} photo.jpg",
        "```",
        "",
        "## Model",
        "",
        f"- architecture: `{model_name}`",
        f"- kwargs: `{json.dumps(model_kwargs, sort_keys=True)}`",
    ]
    if class_names:
        shown = ", ".join(class_names[:20]) + (f", ... ({len(class_names) - 20} more)" if len(class_names) > 20 else "")
        lines.append(f"- classes: {shown}")
    if metadata.get("pretrained_cfg"):
        lines.append(f"- preprocessing: `{metadata['pretrained_cfg']}`")
    if run is None:
        lines += ["", "No training run was given with these weights: data, recipe and metrics are unknown."]
        return "\n".join(lines) + "\n"
    lines += ["", "## Training run", ""]
    if weights is not None:
        saved = ", ".join(f"{k} {metadata[k]}" for k in ("epoch", "val_top1", "weights") if k in metadata)
        lines.append(f"Weights: `{weights.name}`" + (f" ({saved})" if saved else "") + ".")
    config = _read_config(run)
    if config:
        data = {k: config[k] for k in ("preset", "data", "dataset", "train_split", "val_split", "img_size") if k in config}
        lines += ["", "### Data", "", *[f"- {k}: `{v}`" for k, v in data.items()]]
        lines += ["", "### Recipe", "", "The run's resolved `config.yaml`:", "", "```yaml",
                  (run / "config.yaml").read_text(encoding="utf-8").rstrip(), "```"]
    metrics = _read_metrics(run)
    if metrics:
        keys = [k for k in ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "best_top1") if k in metrics[-1]]
        lines += ["", "### Metrics", "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(row.get(k, "") for k in keys) + " |" for row in metrics[-5:]]
        if len(metrics) > 5:
            lines.append(f"\nLast 5 of {len(metrics)} epochs; `metrics.csv` of the run has them all.")
    if figures:
        lines += ["", "### Figures", ""] + [f"![{Path(name).stem}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def _read_config(run: Path) -> Dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def _read_metrics(run: Path) -> List[Dict[str, str]]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- uploading ------------------------------------------------------------------------------


def push_to_hub(
    source: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Add BiFormer model",
) -> str:
    """Upload a training run folder or a checkpoint to ``repo_id`` in timm's layout; returns the commit URL.

    Creates the repository when it does not exist (``private`` applies then). Credentials are
    huggingface_hub's: ``token``, ``HF_TOKEN`` or ``hf auth login``.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise UserError(f"got repo_id={repo_id!r}, expected ORG/NAME or NAME")
    with tempfile.TemporaryDirectory(prefix="biformer-hub-") as tmp:
        folder = save_run_pretrained(source, Path(tmp) / "model", repo_id=repo_id)
        api = HfApi(token=token, library_name="biformer")
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                       commit_message=commit_message)
        except HfHubHTTPError as e:  # no or wrong token, no rights to the organisation, ...
            raise UserError(f"upload to {repo_id!r} failed: {str(e).splitlines()[0]}") from e
    return str(commit.commit_url)


# ---- `biformer push-to-hub` -----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a `biformer train` output folder (its best.safetensors) or a checkpoint file")
    parser.add_argument("repo_id", metavar="REPO_ID", help="ORG/NAME on the Hugging Face Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="only write the folder here (what would be uploaded); no network")
    parser.add_argument("--save-dir", dest="output", help=argparse.SUPPRESS)  # its former name


def run(args: argparse.Namespace) -> int:
    if args.output:
        folder = save_run_pretrained(args.source, args.output, repo_id=args.repo_id)
        print(f"wrote {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
        return 0
    url = push_to_hub(args.source, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {args.source} to {args.repo_id}: {url}")
    return 0
