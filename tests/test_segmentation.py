"""UperNet / Semantic FPN with a BiFormer backbone on small synthetic ADE20K-style folders."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

from biformer.engine.optim import LRSchedule, build_optimizer
from biformer.cli import main
from biformer.segmentation import (
    SegmentationFolder,
    evaluate_miou,
    load_segmentor,
    save_segmentor,
    semantic_fpn,
    upernet,
)
from biformer.segmentation.engine import confusion_matrix, metrics_from_confusion
from biformer.segmentation.models import IGNORE_INDEX, IMAGENET_MEAN
from biformer.segmentation.synthetic import DEMO_CLASSES, write_ade_shapes

BACKBONE = dict(backbone="biformer_tiny", backbone_kwargs=dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256),
                                                                head_dim=16))
# narrow heads keep the tests cheap; the paper's widths are the builders' defaults
SMALL: Dict[str, Dict[str, Any]] = {
    "upernet": dict(channels=32, auxiliary_channels=16),
    "semantic_fpn": dict(fpn_channels=32, channels=16),
}
BUILDERS = {"upernet": upernet, "semantic_fpn": semantic_fpn}
K = len(DEMO_CLASSES)
# the synthetic images are ~100 px: crops of 64 from a 256x96 base scale (the paper: 512 from 2048x512)
DATA = dict(crop_size=64, scale=(256, 96))


def _build(name: str, **kwargs: Any) -> torch.nn.Module:
    return BUILDERS[name](num_classes=K, **BACKBONE, **{**SMALL[name], **kwargs})


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return write_ade_shapes(tmp_path_factory.mktemp("ade"), num_train=4, num_val=2, size_range=(80, 112), seed=1)


@pytest.mark.parametrize("name", ["upernet", "semantic_fpn"])
@pytest.mark.parametrize("size", [(320, 480), (300, 410)])
def test_logits_at_input_size_for_odd_sizes(name, size):
    torch.manual_seed(0)
    model = _build(name).eval()  # default n_win=8: a 300x410 input gives 75x103 maps, padded to the grid
    assert model.backbone.n_win == 8
    with torch.no_grad():
        logits = model(torch.rand(2, 3, *size))
        main_logits, aux = model.forward_with_aux(torch.rand(1, 3, *size))
    assert logits.shape == (2, K, *size) and torch.isfinite(logits).all()
    assert main_logits.shape == (1, K, *size)
    assert (aux.shape == (1, K, *size)) if name == "upernet" else aux is None
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, *size))


def fit_steps(model, optimizer, schedule, compute_losses, steps):
    """``steps`` AdamW updates as the engine makes them (lr = peak x schedule); the loss dicts, as floats."""
    peak = [g["lr"] for g in optimizer.param_groups]
    history = []
    for step in range(steps):
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * schedule(step)
        losses = compute_losses()
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({**{k: float(v.detach()) for k, v in losses.items()}, "loss": float(loss.detach())})
    return history


@pytest.mark.parametrize("name", ["upernet", "semantic_fpn"])
def test_a_few_training_steps_reduce_the_loss(ade, name):
    # the training path of `biformer segment train`: its data pipeline, optimizer, schedule and losses
    torch.manual_seed(0)
    model = _build(name, n_win=4)  # 64 px crops: 16x16 tokens at stride 4 make a 4x4 grid of 4x4 regions
    dataset = SegmentationFolder(ade, "training", train=True, **DATA)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    steps = 24
    history = fit_steps(model, build_optimizer(model, 5e-3, weight_decay=0.01),
                        LRSchedule("poly", steps, warmup_steps=4, warmup_ratio=0.1),
                        lambda: model.losses(*batch), steps)
    losses = [record["loss"] for record in history]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert ("loss_aux" in history[0]) == (name == "upernet")
    # over seeds 0-3 this ratio was 0.50-0.55 (UperNet) and 0.28-0.32 (Semantic FPN)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


def test_metrics_follow_mmsegmentation():
    pred = torch.tensor([[0, 0, 1, 1, 2]])
    label = torch.tensor([[0, 1, 1, IGNORE_INDEX, IGNORE_INDEX]])
    conf = confusion_matrix(pred, label, 3)
    assert conf.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]  # rows: label, columns: prediction
    m = metrics_from_confusion(conf, ["a", "b", "c"])
    # IoU a = 1 / (1 + 2 - 1), b = 1 / (2 + 1 - 1); c occurs nowhere (NaN, left out of the mean)
    assert m["IoU"]["a"] == pytest.approx(0.5) and m["IoU"]["b"] == pytest.approx(0.5) and math.isnan(m["IoU"]["c"])
    assert m["mIoU"] == pytest.approx(0.5) and m["mAcc"] == pytest.approx(0.75) and m["aAcc"] == pytest.approx(2 / 3)
    perfect = metrics_from_confusion(confusion_matrix(label.clamp(max=1), label, 3))
    assert perfect["mIoU"] == perfect["aAcc"] == 1.0
    with pytest.raises(ValueError, match="got label 7 but the model has 3 classes"):
        confusion_matrix(pred, torch.tensor([[7, 0, 0, 0, 0]]), 3)


def test_ade_folder_pipelines(ade):
    raw = SegmentationFolder(ade, "validation", reduce_zero_label=False)
    _, stored = raw.load(0)
    reduced = SegmentationFolder(ade, "validation", **DATA)
    image, label = reduced[0]
    # ADE20K's convention: 0 (the frame) is ignored, 1..K become 0..K-1; labels keep their stored size
    assert torch.equal(label, torch.where(stored == 0, IGNORE_INDEX, stored - 1))
    assert set(label.unique().tolist()) <= set(range(K)) | {IGNORE_INDEX}
    # evaluation images are rescaled to fit the 256x96 scale, aspect kept
    h, w = stored.shape
    factor = min(256 / max(h, w), 96 / min(h, w))
    assert image.shape == (3, int(h * factor + 0.5), int(w * factor + 0.5))

    torch.manual_seed(0)
    # rescaled by 0.5-2x of 256x96, the short side is at most 192, so a 200 px crop is always padded
    train = SegmentationFolder(ade, "training", train=True, **{**DATA, "crop_size": 200})
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 200, 200) and label.shape == (200, 200) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= set(range(K)) | {IGNORE_INDEX}
        # padding goes below and right of the crop: the image gets the mean colour (0 once normalised, as
        # mmseg pads), the label is ignored
        padded = (image == torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).all(dim=0)
        rows, cols = padded.all(dim=1), padded.all(dim=0)
        assert rows[-1] or cols[-1]
        assert (label[rows] == IGNORE_INDEX).all() and (label[:, cols] == IGNORE_INDEX).all()


def test_eval_gives_miou_end_to_end(ade):
    torch.manual_seed(0)
    model = _build("upernet", n_win=4)
    metrics = evaluate_miou(model, SegmentationFolder(ade, "validation", **DATA), K, torch.device("cpu"), DEMO_CLASSES)
    assert set(metrics) == {"mIoU", "mAcc", "aAcc", "IoU"} and list(metrics["IoU"]) == list(DEMO_CLASSES)
    assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["aAcc"] <= 1.0


def test_save_and_load_rebuild_the_same_segmentor(tmp_path):
    torch.manual_seed(0)
    model = _build("semantic_fpn").eval()
    save_segmentor(tmp_path / "seg.safetensors", model, DEMO_CLASSES)
    loaded, info = load_segmentor(tmp_path / "seg.safetensors")
    assert info["builder"] == "semantic_fpn" and info["class_names"] == list(DEMO_CLASSES)
    x = torch.rand(1, 3, 75, 99)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


def test_cli_train_eval_predict(ade, tmp_path, capsys, monkeypatch):
    """segment train on an ADE-layout root writes the engine's run folder; eval reads best.safetensors and
    prints JSON (with per-class IoU) with --json; predict writes a PNG only when given --output."""
    run = tmp_path / "run"
    common = ["--backbone", "biformer_tiny", "--backbone-kwargs", '{"depths": [1, 1, 1, 1], "head_dim": 16, '
              '"embed_dims": [32, 64, 128, 256]}', "--model-kwargs", '{"fpn_channels": 32, "channels": 16}',
              "--n-win", "4", "--crop-size", "64", "--scale", "256", "96", "--num-workers", "0", "--no-progress",
              "--no-tensorboard"]
    assert main(["segment", "train", "--data", str(ade), "--output", str(run), "--model", "semantic_fpn", *common,
                 "--epochs", "1", "--batch-size", "2", "--log-every", "1"]) == 0
    err = capsys.readouterr().err
    assert "epoch 1/1: train loss" in err and "mIoU" in err  # the validation split is scored at the end
    for name in ("config.yaml", "last.safetensors", "best.safetensors", "state.pt", "metrics.csv", "steps.csv"):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert row["epoch"] == "1" and 0.0 <= float(row["val_mIoU"]) <= 1.0

    assert main(["segment", "eval", "--checkpoint", str(run / "best.safetensors"), "--data", str(ade),
                 "--scale", "256", "96", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert list(metrics["IoU"]) == list(DEMO_CLASSES) and metrics["num_images"] == 2
    assert metrics["mIoU"] == pytest.approx(float(row["val_mIoU"]), abs=1e-5)

    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    assert main(["segment", "predict", "chelsea", "--checkpoint", str(run / "last.safetensors"),
                 "--scale", "256", "96"]) == 0
    assert "largest classes" in capsys.readouterr().out and set(tmp_path.iterdir()) == before
    png = tmp_path / "cat.png"
    assert main(["segment", "predict", "chelsea", "--checkpoint", str(run / "last.safetensors"), "--output", str(png),
                 "--scale", "256", "96"]) == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (451, 300) and im.mode == "RGB"
        assert np.asarray(im).std() > 0
    assert main(["segment", "predict", "no_such_image.png", "--checkpoint", str(run / "last.safetensors")]) == 2


@pytest.mark.slow
def test_cli_predict_untrained_default_model_on_a_photo(tmp_path, capsys):
    # what a new user runs first: the paper's full-size UperNet (random weights) on a scikit-image photo
    png = tmp_path / "coffee.png"
    assert main(["segment", "predict", "coffee", "--output", str(png)]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "largest classes" in out
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (600, 400) and im.mode == "RGB"
