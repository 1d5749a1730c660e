"""RetinaNet / Mask R-CNN with a BiFormer backbone on small synthetic COCO-format data."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

from biformer.engine.optim import LRSchedule, build_optimizer
from biformer.engine.steploop import TrainLoop
from biformer.images import load_image
from biformer.cli import main
from biformer.detection import CocoDetection, evaluate_coco, load_detector, mask_rcnn, retinanet, save_detector
from biformer.detection.data import collate
from biformer.detection.engine import _summarise, detection_losses, to_coco_results
from biformer.detection.synthetic import SHAPE_CLASSES, write_coco_shapes

BACKBONE = dict(backbone="biformer_tiny", backbone_kwargs=dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256),
                                                                head_dim=16))
# small images and heads keep every test cheap; the paper's sizes are the builders' defaults
SMALL: Dict[str, Dict[str, Any]] = {
    "retinanet": dict(fpn_channels=32, min_size=96, max_size=128),
    "mask_rcnn": dict(fpn_channels=32, min_size=96, max_size=128, box_head_channels=64, mask_head_channels=16,
                      box_batch_size_per_image=32, rpn_batch_size_per_image=32),
}
BUILDERS = {"retinanet": retinanet, "mask_rcnn": mask_rcnn}


def _build(name: str, **kwargs: Any) -> torch.nn.Module:
    return BUILDERS[name](num_classes=len(SHAPE_CLASSES), **BACKBONE, **{**SMALL[name], **kwargs})


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Dict[str, Path]:
    return write_coco_shapes(tmp_path_factory.mktemp("coco"), num_train=4, num_val=3, size_range=(80, 112), seed=1)


# peak learning rates at which 16 steps on one batch of two tiny images train smoothly
# (over seeds 0-3 the loss ratio below was 0.46-0.49 for RetinaNet, 0.51-0.73 for Mask R-CNN)
TRAIN_LR = {"retinanet": 1e-3, "mask_rcnn": 2e-3}


@pytest.mark.parametrize("name", ["retinanet", "mask_rcnn"])
def test_a_few_training_steps_reduce_the_loss(coco, name):
    # the training path of `biformer detect train`: its optimizer, warmup + decay schedule, loss function
    torch.manual_seed(0)
    model = _build(name, n_win=4)  # n_win=4 suits these ~100 px images (the paper's 16 is for ~800x1333)
    dataset = CocoDetection(coco["train_images"], coco["train_annotations"], masks=name == "mask_rcnn")
    batch = collate([dataset[0], dataset[1]])
    steps = 16
    loop = TrainLoop(
        model, build_optimizer(model, TRAIN_LR[name], weight_decay=1e-4),
        LRSchedule("cosine", steps, warmup_steps=4, warmup_ratio=0.1),
        detection_losses(model, torch.device("cpu")), log=lambda line: None, log_every=1,
    )
    history = loop.run(itertools.repeat(batch))
    losses = [record["loss"] for record in history]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert set(history[0]) >= ({"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
                               if name == "mask_rcnn" else {"classification", "bbox_regression"})
    # means over 4 steps: Mask R-CNN's losses are noisy (it samples anchors and proposals)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


@pytest.mark.parametrize("name", ["retinanet", "mask_rcnn"])
def test_eval_outputs_for_odd_input_sizes(name):
    torch.manual_seed(0)
    # score threshold 0 so that the untrained model reports detections; sizes near native (min_size 300)
    # and the default n_win=16, so the backbone pads ~300x450 maps to its region grid
    threshold = dict(box_score_thresh=0.0) if name == "mask_rcnn" else dict(score_thresh=0.0)
    model = _build(name, min_size=300, max_size=480, **threshold)
    sizes = [(320, 480), (300, 410)]
    with torch.no_grad():
        outputs = model.eval()([torch.rand(3, *s) for s in sizes])
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, sizes):
        n = len(out["boxes"])
        assert n > 0 and out["boxes"].shape == (n, 4) and out["scores"].shape == out["labels"].shape == (n,)
        assert (out["boxes"][:, 0::2] >= 0).all() and (out["boxes"][:, 0::2] <= w).all()
        assert (out["boxes"][:, 1::2] >= 0).all() and (out["boxes"][:, 1::2] <= h).all()
        # labels 1..K: RetinaNet never reports torchvision's reserved slot 0, even at threshold 0
        assert ((out["labels"] >= 1) & (out["labels"] <= len(SHAPE_CLASSES))).all(), out["labels"].unique()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()  # sorted, best first
        if name == "mask_rcnn":
            assert out["masks"].shape == (n, 1, h, w)
            assert 0 <= out["masks"].min() and out["masks"].max() <= 1


def test_coco_metrics_are_one_for_ground_truth_and_run_end_to_end(coco):
    dataset = CocoDetection(coco["val_images"], coco["val_annotations"], masks=True)
    perfect = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        n = len(target["boxes"])
        output = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
                  "masks": target["masks"][:, None].float()}
        perfect += to_coco_results(output, int(target["image_id"]), dataset.category_ids)
    for iou_type in ("bbox", "segm"):
        stats, _ = _summarise(dataset.coco, perfect, iou_type)
        assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)

    torch.manual_seed(0)
    metrics = evaluate_coco(_build("mask_rcnn").eval(), dataset, torch.device("cpu"))
    assert set(metrics) >= {"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_save_and_load_rebuild_the_same_detector(tmp_path):
    torch.manual_seed(0)
    model = _build("retinanet", score_thresh=0.0).eval()
    save_detector(tmp_path / "det.safetensors", model, SHAPE_CLASSES)
    loaded, info = load_detector(tmp_path / "det.safetensors")
    assert info["builder"] == "retinanet" and info["class_names"] == list(SHAPE_CLASSES)
    image = torch.rand(3, 100, 130)
    with torch.no_grad():
        a, b = model([image])[0], loaded.eval()([image])[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])


def test_cli_train_eval_predict(coco, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--backbone", "biformer_tiny", "--backbone-kwargs", '{"depths": [1, 1, 1, 1], "head_dim": 16, '
              '"embed_dims": [32, 64, 128, 256]}', "--model-kwargs",
              '{"fpn_channels": 32, "box_head_channels": 64, "mask_head_channels": 16, "box_batch_size_per_image": 32}',
              "--min-size", "96", "--max-size", "128", "--workers", "0"]
    data = ["--images", str(coco["train_images"]), "--annotations", str(coco["train_annotations"])]
    assert main(["detect", "train", *data, "--output", str(run), "--model", "mask_rcnn", *common,
                 "--steps", "2", "--batch-size", "2", "--log-every", "1"]) == 0
    assert (run / "last.safetensors").is_file() and (run / "last.train.pt").is_file()
    assert main(["detect", "train", *data, "--output", str(run), "--resume", "--steps", "3", "--batch-size", "2",
                 "--workers", "0"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out

    assert main(["detect", "eval", "--checkpoint", str(run / "last.safetensors"), "--images", str(coco["val_images"]),
                 "--annotations", str(coco["val_annotations"]), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "bbox: AP" in out and "segm: AP" in out and (tmp_path / "m.json").is_file()

    png = tmp_path / "cat.png"
    # threshold 0 also lowers the model's own 0.05 cut-off, so even a 3-step model draws its 5 best boxes
    assert main(["detect", "predict", "chelsea", "--checkpoint", str(run / "last.safetensors"), "--output", str(png),
                 "--score-threshold", "0.0", "--max-detections", "5"]) == 0
    assert "5 detections with score >= 0.0" in capsys.readouterr().out
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (451, 300) and im.mode == "RGB"
        drawn = np.asarray(im)
    assert (drawn != np.asarray(load_image("chelsea"))).any()
    assert main(["detect", "predict", "no_such_image.png", "--checkpoint", str(run / "last.safetensors")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mask_rcnn", "retinanet"])
def test_cli_predict_untrained_default_model_on_a_photo(tmp_path, capsys, model):
    # what a new user runs first: the paper's full-size model (random weights) on a scikit-image photo
    png = tmp_path / "astronaut.png"
    assert main(["detect", "predict", "astronaut", "--model", model, "--output", str(png),
                 "--score-threshold", "0.0", "--max-detections", "10"]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "10 detections" in out
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (512, 512) and im.mode == "RGB"
