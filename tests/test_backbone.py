"""BiFormer as a dense-prediction backbone, and the plumbing the detection/segmentation tasks share."""
from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any, Dict

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import biformer  # noqa: F401  (registers the models)
from biformer.backbone import BiFormerBackbone
from biformer.engine.optim import LRSchedule, build_optimizer
from biformer.images import SAMPLE_IMAGES, load_image
from biformer.checkpoint import save_model
from biformer.models.biformer import MODEL_ARGS, CheckpointMismatchError

TINY = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), head_dim=16)
ROOT = Path(__file__).resolve().parents[1]


def _layer_norm_2d(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(320, 480), (300, 410)])
def test_four_normalised_maps_at_strides_4_to_32_for_odd_sizes(size):
    torch.manual_seed(0)
    backbone = BiFormerBackbone("biformer_tiny", n_win=8, **TINY).eval()
    assert not hasattr(backbone, "head") and not hasattr(backbone, "norm")
    with torch.no_grad():
        feats = backbone(torch.rand(1, 3, *size))
    assert backbone.strides == [4, 8, 16, 32]
    assert [f.shape for f in feats] == [
        (1, c, math.ceil(size[0] / s), math.ceil(size[1] / s)) for c, s in zip((32, 64, 128, 256), (4, 8, 16, 32))
    ]
    for f in feats:  # each output has its own LayerNorm over channels (identity affine at init)
        assert torch.allclose(f.mean(1), torch.zeros(()), atol=1e-4)
        assert torch.allclose(f.var(1, unbiased=False), torch.ones(()), atol=1e-2)


def test_small_maps_with_n_win_16_pad_regions():
    # 64 px input: the stride-4 map is 16x16 and the stride-16 map 4x4, far fewer tokens than 16x16 regions
    backbone = BiFormerBackbone("biformer_tiny", n_win=16, **TINY).eval()
    with torch.no_grad():
        feats = backbone(torch.rand(2, 3, 64, 72))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 18), (8, 9), (4, 5), (2, 3)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_topk_larger_than_region_grid_is_refused():
    with pytest.raises(ValueError, match=r"topk=16 but the map has only 9 regions"):
        BiFormerBackbone("biformer_tiny", n_win=3, **TINY)


def test_loads_our_classification_checkpoint_and_matches_classifier_stages(tmp_path):
    torch.manual_seed(0)
    classifier = timm.create_model("biformer_tiny", num_classes=10, n_win=4, **TINY).eval()
    for m in classifier.modules():  # non-trivial BatchNorm statistics, so a missed load would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tiny.safetensors"
    save_model(path, classifier, "biformer_tiny", dict(num_classes=10, **TINY))

    backbone = BiFormerBackbone("biformer_tiny", n_win=4, pretrained=path, **TINY).eval()
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        expected = classifier.forward_intermediates(x, intermediates_only=True)
        got = backbone(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, _layer_norm_2d(e), rtol=1e-4, atol=1e-4)
    # the region grid is a per-task setting: the same weights load at n_win=16
    BiFormerBackbone("biformer_tiny", n_win=16, pretrained=path, **TINY)


def test_loads_the_original_classification_checkpoint_format(tmp_path):
    from .conftest import original_state_dict

    state = original_state_dict("tiny")  # the original's key names and shapes, head and final norm included
    torch.save({"model": state}, tmp_path / "orig.pth")
    backbone = BiFormerBackbone("biformer_tiny", n_win=16, pretrained=tmp_path / "orig.pth")
    assert torch.equal(backbone.stem.conv1.weight, state["downsample_layers.0.0.weight"])
    assert torch.equal(backbone.stages[2].blocks[1].attn.qkv.weight, state["stages.2.1.attn.qkv.qkv.weight"])
    assert torch.equal(backbone.stages[3].blocks[0].attn.lce.weight, state["stages.3.0.attn.lepe.weight"])
    # the per-output norms are new (as in the original's dense wrapper): identity affine
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in backbone.extra_norms)


def test_refuses_a_whole_task_model_as_backbone_weights(tmp_path):
    from biformer.segmentation import save_segmentor, semantic_fpn

    model = semantic_fpn("biformer_tiny", num_classes=3, backbone_kwargs=TINY, fpn_channels=16, channels=8)
    save_segmentor(tmp_path / "seg.safetensors", model, ["a", "b", "c"])
    with pytest.raises(CheckpointMismatchError, match="whole segmentation model"):
        BiFormerBackbone("biformer_tiny", pretrained=tmp_path / "seg.safetensors", **TINY)


def test_refuses_a_checkpoint_of_another_model(tmp_path):
    classifier = timm.create_model("biformer_tiny", num_classes=0, **TINY)
    path = tmp_path / "tiny.safetensors"
    save_model(path, classifier, "biformer_tiny", TINY)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        BiFormerBackbone("biformer_tiny", pretrained=path, depths=(1, 1, 2, 1), embed_dims=TINY["embed_dims"],
                         head_dim=16)


def test_norm_eval_and_frozen_stages():
    backbone = BiFormerBackbone("biformer_tiny", n_win=4, norm_eval=True, frozen_stages=1, **TINY)
    backbone.train()
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not backbone.stem.training and not backbone.stages[0].training and backbone.stages[1].training
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.stages[0].parameters())
    assert not any(p.requires_grad for p in backbone.extra_norms[0].parameters())
    assert all(p.requires_grad for p in backbone.stages[1].parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    backbone(torch.rand(2, 3, 64, 64)).__len__()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics untouched


def test_lr_schedules_follow_mmcv():
    step = LRSchedule("step", 1200, warmup_steps=500, warmup_ratio=1e-3, milestones=(800, 1100))
    assert step(0) == pytest.approx(1e-3)
    assert step(250) == pytest.approx(1 - 0.5 * (1 - 1e-3))
    assert step(500) == step(799) == 1.0
    assert step(800) == pytest.approx(0.1) and step(1100) == pytest.approx(0.01)
    poly = LRSchedule("poly", 1000, warmup_steps=100, warmup_ratio=1e-6)
    assert poly(100) == pytest.approx(0.9) and poly(1000) == 0.0
    cosine = LRSchedule("cosine", 1000, min_ratio=1e-8)
    assert cosine(0) == 1.0 and cosine(500) == pytest.approx(0.5) and cosine(1000) == pytest.approx(1e-8)
    with pytest.raises(ValueError, match="policy='linear'"):
        LRSchedule("linear", 10)


def test_load_image_takes_files_and_scikit_image_names(tmp_path):
    cat = load_image("chelsea")
    assert cat.mode == "RGB" and cat.size == (451, 300)
    cat.save(tmp_path / "cat.png")
    assert load_image(tmp_path / "cat.png").size == (451, 300)
    with pytest.raises(FileNotFoundError, match="astronaut"):
        load_image("no_such_picture")
    assert {"astronaut", "coffee", "chelsea"} <= set(SAMPLE_IMAGES)


# ---- OpenMMLab registration and the example configs ------------------------------------------


def test_registers_with_mm_registries_when_present(monkeypatch):
    registered = {}

    class FakeRegistry:
        def register_module(self, name, module, force=False):
            registered[name] = module

    for name in ("mmdet", "mmdet.registry"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["mmdet.registry"].MODELS = FakeRegistry()
    import biformer.integrations.mm as mm

    assert mm.register() == ["mmdet.registry.MODELS"]
    cls = registered[mm.REGISTRY_NAME]
    backbone = cls(model_name="biformer_tiny", n_win=4, norm_eval=True, **TINY)
    backbone.init_weights()
    out = backbone(torch.rand(1, 3, 64, 64))
    assert isinstance(out, tuple) and len(out) == 4
    with pytest.raises(ValueError, match="init_cfg"):
        cls(model_name="biformer_tiny", init_cfg=dict(type="Kaiming"), **TINY)


def _load_config(path: Path) -> Dict[str, Any]:
    """Execute an mm config, merging a local ``_base_`` (mm's own ``mmdet::`` bases are not needed here)."""
    namespace: Dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    base = namespace.get("_base_", "")
    merged: Dict[str, Any] = _load_config(path.parent / base) if base.startswith("./") else {}

    def merge(into: Dict[str, Any], new: Dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict) and not v.get("_delete_"):
                merge(into[k], v)
            else:
                into[k] = v

    merge(merged, {k: v for k, v in namespace.items() if not k.startswith("__")})
    return merged


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.py")), ids=lambda p: p.name)
def test_mm_configs_name_our_backbone_with_matching_widths(path):
    from biformer.integrations.mm import REGISTRY_NAME

    cfg = _load_config(path)
    backbone = cfg["model"]["backbone"]
    assert backbone["type"] == REGISTRY_NAME
    assert cfg["custom_imports"]["imports"] == ["biformer.integrations.mm"]
    dims = list(MODEL_ARGS[backbone["model_name"]]["embed_dims"])
    assert backbone["n_win"] == (16 if path.parent.name == "mmdet" else 8)
    model = cfg["model"]
    if "neck" in model and path.name.startswith(("mask_rcnn", "retinanet", "fpn")):
        assert model["neck"]["in_channels"] == dims
    if "auxiliary_head" in model:
        assert model["decode_head"]["in_channels"] == dims and model["auxiliary_head"]["in_channels"] == dims[2]
