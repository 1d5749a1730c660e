"""Loading the original's checkpoints, our safetensors format, conversion, and refusals."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import pytest
import timm
import torch
from safetensors.torch import save_file

import biformer  # noqa: F401
from biformer.checkpoint import CheckpointError, convert, load_model, read_state_dict, save_model
from biformer.cli import main as cli_main
from biformer.models.biformer import CheckpointMismatchError, checkpoint_filter_fn

from .conftest import original_state_dict

VARIANTS = ["tiny", "small", "base", "stl"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_original_key_maps_onto_the_model(variant: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(f"biformer_{variant}")
    converted = checkpoint_filter_fn(original_state_dict(variant, device="meta"), model)
    assert set(converted) == set(model.state_dict())
    assert all(converted[k].shape == v.shape for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrapping", ["raw", "model", "state_dict"])
def test_timm_pretrained_file_loads_every_wrapping(tmp_path: Path, wrapping: str) -> None:
    state = original_state_dict("tiny")
    path = tmp_path / "orig.pth"
    torch.save(state if wrapping == "raw" else {wrapping: state, "epoch": 3}, path)
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.stem.conv1.weight, state["downsample_layers.0.0.weight"])
    assert torch.equal(model.stages[2].blocks[1].attn.qkv.weight, state["stages.2.1.attn.qkv.qkv.weight"])
    assert torch.equal(model.stages[3].blocks[0].attn.lce.weight, state["stages.3.0.attn.lepe.weight"])
    assert torch.equal(model.head.weight, state["head.weight"])


def test_pretrained_with_other_num_classes_keeps_the_backbone(tmp_path: Path) -> None:
    state = original_state_dict("tiny")
    torch.save({"model": state}, tmp_path / "orig.pth")
    model = timm.create_model(
        "biformer_tiny", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(tmp_path / "orig.pth"))
    )
    assert model.head.weight.shape == (10, 512)
    assert torch.equal(model.stages[1].blocks[0].mlp.fc2.weight, state["stages.1.0.mlp.3.weight"])


@pytest.mark.parametrize("variant", ["tiny", "stl"])
def test_convert_cli_round_trip_gives_identical_outputs(tmp_path: Path, variant: str) -> None:
    src, dst = tmp_path / "orig.pth", tmp_path / "ours.safetensors"
    torch.save({"model": original_state_dict(variant)}, src)
    assert cli_main(["convert", str(src), str(dst)]) == 0
    via_timm = timm.create_model(f"biformer_{variant}", pretrained=True, pretrained_cfg_overlay=dict(file=str(src)))
    ours, info = load_model(dst)
    assert info["model_name"] == f"biformer_{variant}"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), via_timm.eval()(x), atol=0, rtol=0)
    # our own file also loads through timm's pretrained path
    again = timm.create_model(f"biformer_{variant}", pretrained=True, pretrained_cfg_overlay=dict(file=str(dst)))
    assert torch.equal(again.head.weight, ours.head.weight)


def test_save_and_load_our_format_keeps_kwargs_and_preprocessing(tmp_path: Path) -> None:
    model = timm.create_model("biformer_tiny", num_classes=10, depths=(1, 1, 1, 1), n_win=4)
    path = tmp_path / "m.safetensors"
    save_model(path, model, "biformer_tiny", {"num_classes": 10, "depths": [1, 1, 1, 1], "n_win": 4})
    loaded, info = load_model(path)
    assert info["model_kwargs"]["n_win"] == 4 and info["pretrained_cfg"]["crop_pct"] == 0.875
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_checkpoint_of_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    model = timm.create_model("biformer_tiny", depths=(1, 1, 1, 1))
    path = tmp_path / "tiny.safetensors"
    save_model(path, model, "biformer_tiny", {"depths": [1, 1, 1, 1]})
    with pytest.raises(CheckpointMismatchError, match="holds a biformer_tiny checkpoint, but model biformer_small"):
        load_model(path, "biformer_small")
    torch.save(original_state_dict("tiny"), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointMismatchError, match="does not fit model biformer_stl"):
        load_model(tmp_path / "tiny.pth", "biformer_stl")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda sd: sd.pop("stages.0.0.norm1.weight"), r"1 missing keys: stages\.0\.blocks\.0\.norm1\.weight"),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)), r"1 unexpected keys: extra\.weight"),
        (
            lambda sd: sd.__setitem__("stages.1.0.attn.wo.weight", torch.zeros(128, 64)),
            r"stages\.1\.blocks\.0\.attn\.proj\.weight: checkpoint \(128, 64\) vs model \(128, 128\)",
        ),
    ],
)
def test_misfitting_checkpoint_names_keys_and_shapes(damage, message) -> None:
    state = original_state_dict("tiny")
    damage(state)
    model = timm.create_model("biformer_tiny")
    with pytest.raises(CheckpointMismatchError, match=message):
        checkpoint_filter_fn(state, model)


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    state = {"a": torch.randn(100, 100)}
    save_file(state, tmp_path / "ok.safetensors")
    torch.save(state, tmp_path / "ok.pth")
    for name in ("ok.safetensors", "ok.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="cut_"):
            read_state_dict(tmp_path / f"cut_{name}")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_state_dict(tmp_path / "missing.pth")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": {"x": _RunsCode(str(marker))}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(tmp_path / "evil.pth")
    with pytest.raises(Exception):
        timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "evil.pth")))
    assert not marker.exists()


def test_atomic_write_gives_the_usual_permissions_and_no_leftovers(tmp_path) -> None:
    import os
    import stat

    from biformer.checkpoint import atomic_write

    target = tmp_path / "out.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"data"))
    assert target.read_bytes() == b"data"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

    def fail(tmp: str) -> None:
        open(tmp, "wb").write(b"half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"data"  # the old file stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# ---- one loader: every command reads a checkpoint file once ------------------------------------


def _count_reads(monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> Dict[str, int]:
    """Count every way ``checkpoint`` can be opened: safetensors' reader, torch.load on a path, and open()."""
    import builtins

    import biformer.checkpoint as ckpt_module
    import safetensors

    target = str(checkpoint)
    counts = {"safe_open": 0, "torch.load": 0, "open": 0}

    def counting(name: str, real):
        def wrapper(file, *args, **kwargs):
            if str(file) == target:
                counts[name] += 1
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(ckpt_module, "safe_open", counting("safe_open", ckpt_module.safe_open))
    monkeypatch.setattr(safetensors, "safe_open", counting("safe_open", safetensors.safe_open))
    monkeypatch.setattr(torch, "load", counting("torch.load", torch.load))
    monkeypatch.setattr(builtins, "open", counting("open", builtins.open))
    return counts


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("kind", ["ours", "original"])
def test_eval_and_predict_open_the_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture, kind: str, command: str) -> None:
    from PIL import Image

    for name, red in (("a", 200), ("b", 20)):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (red, 90, 90)).save(tmp_path / "data" / "val" / name / "0.png")
    if kind == "ours":
        path = tmp_path / "tiny.safetensors"
        kwargs = dict(num_classes=2, depths=[1, 1, 1, 1], embed_dims=[32, 64, 128, 256], head_dim=16, n_win=4)
        save_model(path, timm.create_model("biformer_tiny", **kwargs), "biformer_tiny", kwargs,
                   {"class_names": '["a", "b"]'})
    else:
        path = tmp_path / "original.pth"
        torch.save({"model": original_state_dict("tiny")}, path)
    counts = _count_reads(monkeypatch, path)
    common = ["--checkpoint", str(path), "--model", "biformer_tiny", "--device", "cpu", "--json"]
    if command == "eval":
        argv = ["eval", *common, "--data", str(tmp_path / "data"), "--img-size", "64", "--num-workers", "0"]
    else:
        argv = ["predict", str(tmp_path / "data" / "val" / "a" / "0.png"), *common, "--top-k", "2"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["model"] == "biformer_tiny"
    assert sum(counts.values()) == 1, counts  # one open, by one reader
    assert counts["safe_open" if kind == "ours" else "open"] == 1, counts


@pytest.mark.parametrize("kind", ["ours", "original"])
def test_pretrained_weights_open_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """`train --pretrained` and `--pretrained-backbone` load through load_weights, on the same reader."""
    from biformer.checkpoint import load_weights

    model = timm.create_model("biformer_tiny", num_classes=5)
    if kind == "ours":
        path = tmp_path / "tiny.safetensors"
        save_model(path, timm.create_model("biformer_tiny"), "biformer_tiny")
    else:
        path = tmp_path / "tiny.pth"
        torch.save(original_state_dict("tiny"), path)
    counts = _count_reads(monkeypatch, path)
    assert load_weights(model, path, "biformer_tiny") == ["head.bias", "head.weight"]  # 1000 classes, not 5
    assert sum(counts.values()) == 1, counts


def test_one_loader_reads_every_kind_of_file(tmp_path: Path) -> None:
    """Classifier (ours, the original's) and task model go through load_checkpoint; each refuses the others."""
    from biformer.checkpoint import load_checkpoint, load_task_model
    from biformer.segmentation import BUILDERS, save_segmentor, semantic_fpn

    tiny = dict(depths=[1, 1, 1, 1], embed_dims=[32, 64, 128, 256], head_dim=16, n_win=4)
    classifier = timm.create_model("biformer_tiny", num_classes=3, **tiny)
    ours = tmp_path / "ours.safetensors"
    save_model(ours, classifier, "biformer_tiny", {"num_classes": 3, **tiny}, {"class_names": '["x", "y", "z"]'})
    loaded = load_checkpoint(ours)
    assert (loaded.model_name, loaded.class_names, loaded.num_classes) == ("biformer_tiny", ["x", "y", "z"], 3)
    assert loaded.data_config(img_size=48)["input_size"] == (3, 48, 48) and loaded.task is None

    original = tmp_path / "tiny.pth"
    torch.save(original_state_dict("tiny"), original)
    loaded = load_checkpoint(original)
    assert (loaded.model_name, loaded.class_names, loaded.metadata) == ("biformer_tiny", None, {})
    with pytest.raises(CheckpointMismatchError, match=r"holds a biformer_tiny checkpoint \(original format\)"):
        load_checkpoint(original, "biformer_small")

    backbone = {k: v for k, v in tiny.items() if k != "n_win"}
    segmentor = semantic_fpn("biformer_tiny", num_classes=2, n_win=4, backbone_kwargs=backbone, fpn_channels=16,
                             channels=8)
    seg = tmp_path / "seg.safetensors"
    save_segmentor(seg, segmentor, ["bg", "fg"])
    loaded = load_checkpoint(seg, task="segmentation", builders=BUILDERS)
    assert (loaded.model_name, loaded.class_names, loaded.task) == ("semantic_fpn", ["bg", "fg"], "segmentation")
    assert load_task_model(seg, "segmentation", BUILDERS)[1]["class_names"] == ["bg", "fg"]
    with pytest.raises(CheckpointMismatchError, match="whole segmentation model .*biformer segment"):
        load_checkpoint(seg)
    with pytest.raises(CheckpointError, match="is a biformer_tiny classification checkpoint, expected a segmentation"):
        load_checkpoint(ours, task="segmentation", builders=BUILDERS)


def test_an_ablation_run_checkpoint_loads_where_nothing_imported_the_ablation(tmp_path: Path) -> None:
    """Its model registers on import; the loader imports it when a file names it (here: a fresh `biformer predict`)."""
    import subprocess
    import sys

    from PIL import Image

    from biformer.ablate.skeleton import DIGITS_SKELETON

    kwargs = dict(mixer="window", num_classes=3, **DIGITS_SKELETON)
    path = tmp_path / "ablate.safetensors"
    save_model(path, timm.create_model("biformer_ablate", **kwargs), "biformer_ablate", kwargs)
    Image.new("RGB", (64, 64), (90, 20, 200)).save(tmp_path / "x.png")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "biformer", "predict", str(tmp_path / "x.png"), "--checkpoint",
                           str(path), "--json"], capture_output=True, text=True, timeout=300, cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "biformer_ablate"
