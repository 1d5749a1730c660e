"""Issue 13 (part): bad inputs must fail clearly, non-finite values must propagate as in ``reference``,
images must decode at their real bit depth and predictions must not run away with memory."""
from __future__ import annotations

import pytest
import torch

from biformer.errors import UserError
from biformer.layers import BiLevelRoutingAttention, GlobalAttentionLCE
from biformer.models.biformer import BiFormer


# ------------------------------------------------------------------------------------------------
# item 7: layer construction


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: BiLevelRoutingAttention(16, num_heads=2, n_win=0, topk=1), "got n_win=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, n_win=4, region_size=2, topk=1), "give at most one"),
        (lambda: BiLevelRoutingAttention(0), "got dim=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=0), "got num_heads=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, qk_dim=0), "got qk_dim=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, topk=0), "got topk=0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, side_dwconv=4), "got side_dwconv=4"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, side_dwconv=-3), "got side_dwconv=-3"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, qk_scale=0.0), "got qk_scale=0.0"),
        (lambda: BiLevelRoutingAttention(16, num_heads=2, qk_scale=float("nan")), "got qk_scale=nan"),
        (lambda: GlobalAttentionLCE(0), "got dim=0"),
        (lambda: GlobalAttentionLCE(16, num_heads=0), "got num_heads=0"),
        (lambda: GlobalAttentionLCE(16, num_heads=2, side_dwconv=2), "got side_dwconv=2"),
        (lambda: BiFormer(depths=(1, 1, 1, 1), embed_dims=(32,) * 4, head_dim=16, topks=(1, 1, 1, None), n_win=0),
         "got n_win=0"),
    ],
    ids=["n_win0", "n_win_and_region_size", "dim0", "heads0", "qk_dim0", "topk0", "even_kernel", "negative_kernel",
         "scale0", "scale_nan", "global_dim0", "global_heads0", "global_even_kernel", "model_n_win0"],
)
def test_item07_layer_arguments_refused(build, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build()



# ------------------------------------------------------------------------------------------------
# item 5: non-finite values propagate as in the reference backend

_NONFINITE_GRIDS = {  # name: (H, W, n_win); 7x5 in 3x3 regions of 3x2 is padded at the bottom and right
    "unpadded": (8, 8, 4),
    "padded": (7, 5, 3),
}


def _nonfinite_cases():
    cases = []
    for backend in ("sdpa", "dense", "flex"):
        for grid in _NONFINITE_GRIDS:
            for tensor in "qkv":
                for value in ("nan", "inf", "-inf"):
                    marks = [pytest.mark.slow] if backend == "flex" else []  # CPU flex compiles
                    cases.append(pytest.param(backend, grid, tensor, value, marks=marks,
                                              id=f"{backend}-{grid}-{tensor}-{value}"))
    return cases


@pytest.mark.parametrize("backend, grid, tensor, value", _nonfinite_cases())
def test_item05_nonfinite_propagation(backend: str, grid: str, tensor: str, value: str) -> None:
    from biformer.ops import bi_level_routing_attention

    height, width, n_win = _NONFINITE_GRIDS[grid]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, height, width, 8, generator=gen) for _ in range(3))
    bad = dict(q=q, k=k, v=v)[tensor]
    # one token inside the map, one at the bottom-right corner (its copies fill SDPA's padded slots),
    # and a whole channel of one token in the second image
    bad[0, 1, 2, 1] = float(value)
    bad[0, height - 1, width - 1, 5] = float(value)
    bad[1, height // 2, 0, :] = float(value)
    kwargs = dict(num_heads=2, topk=2, n_win=n_win)
    with torch.no_grad():
        expected = bi_level_routing_attention(q, k, v, backend="reference", **kwargs)
        out = bi_level_routing_attention(q, k, v, backend=backend, **kwargs)
    assert not expected.isfinite().all()  # the case does reach the output
    if backend == "dense" and tensor == "k" and value != "nan":
        # documented: dense cannot see the sign of q . inf, so a routed inf key makes the row NaN
        assert (out.isnan() | ~expected.isnan()).all()
        both = ~out.isnan()
        assert torch.equal(out[both].isinf(), expected[both].isinf())
    else:
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out == float("inf"), expected == float("inf"))
        assert torch.equal(out == float("-inf"), expected == float("-inf"))
    finite = out.isfinite() & expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend, grid", [  # two compiles by default; the other pair is slow
    ("sdpa", "padded"), ("dense", "unpadded"),
    pytest.param("sdpa", "unpadded", marks=pytest.mark.slow), pytest.param("dense", "padded", marks=pytest.mark.slow)])
def test_item05_nonfinite_propagation_compiled(backend: str, grid: str) -> None:
    """Compiled on the CPU, the term is behind a graph-level branch (torch.cond): one graph must give
    finite outputs equal to eager for finite inputs, and reference's NaN/inf for every bad input."""
    from biformer.ops import bi_level_routing_attention

    height, width, n_win = _NONFINITE_GRIDS[grid]
    kwargs = dict(num_heads=2, topk=2, n_win=n_win)

    def op(q, k, v):
        return bi_level_routing_attention(q, k, v, backend=backend, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(op, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(2, height, width, 8, generator=gen) for _ in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(compiled(*base), op(*base), rtol=1e-4, atol=1e-5)
        for tensor in "qkv":
            for value in ("nan", "inf", "-inf"):
                q, k, v = (t.clone() for t in base)
                bad = dict(q=q, k=k, v=v)[tensor]
                bad[0, 1, 2, 1] = float(value)
                bad[1, height // 2, 0, :] = float(value)
                expected = bi_level_routing_attention(q, k, v, backend="reference", **kwargs)
                out = compiled(q, k, v)
                if backend == "dense" and tensor != "q":
                    # documented: compiled dense does not sanitise, so a bad key or value outside the
                    # routed regions makes its rows NaN too; never finite where reference is not
                    assert (~out.isfinite() | expected.isfinite()).all(), (tensor, value)
                    assert (out.isnan() | ~expected.isnan()).all(), (tensor, value)
                else:
                    assert torch.equal(out.isnan(), expected.isnan()), (tensor, value)
                    assert torch.equal(out.isinf(), expected.isinf()), (tensor, value)
                finite = out.isfinite() & expected.isfinite()
                torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# item 6: 16-bit images are scaled, not clipped, wherever an image is read


def _sixteen_bit_png(path) -> "np.ndarray":
    """Write a 16-bit greyscale PNG (a 0..65535 ramp) with PIL; return the 8-bit values expected."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ramp).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I;16B", "I;16L", "I"), check.mode  # PIL really kept 16 bits
    return np.rint(ramp / 257.0).astype(np.uint8)


def _decode_open_rgb(tmp_path, png):
    from biformer.images import open_rgb

    return open_rgb(png)


def _decode_backbone(tmp_path, png):
    from biformer.images import load_image

    return load_image(png)


def _decode_viz(tmp_path, png):
    from biformer.viz.images import load_image

    return load_image(png)


def _decode_train_folder(tmp_path, png):
    from biformer.classification.data import open_source

    return open_source(None, str(tmp_path / "data"), "train").load(0)[0]


def _decode_detection(tmp_path, png):
    import json

    from biformer.detection.data import CocoDetection

    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": png.name, "width": 32, "height": 24}],
        "annotations": [], "categories": [{"id": 1, "name": "thing"}],
    }))
    return (CocoDetection(png.parent, ann).load_image(0) * 255).round().byte().permute(1, 2, 0)


def _decode_segmentation(tmp_path, png):
    import numpy as np
    from PIL import Image

    from biformer.segmentation.data import SegmentationFolder

    root = tmp_path / "ade"
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    png.rename(root / "images" / "training" / "a.png")
    Image.fromarray(np.zeros((24, 32), dtype=np.uint8)).save(root / "annotations" / "training" / "a.png")
    image, _ = SegmentationFolder(root, "training").load(0)
    return (image * 255).round().byte().permute(1, 2, 0)


@pytest.mark.parametrize("decode", [_decode_open_rgb, _decode_backbone, _decode_viz, _decode_train_folder,
                                    _decode_detection, _decode_segmentation],
                         ids=["open_rgb", "backbone", "viz", "train_folder", "detection", "segmentation"])
def test_item06_sixteen_bit_png_scaled(tmp_path, decode) -> None:
    import numpy as np

    png = tmp_path / "data" / "train" / "ramp" / "ramp.png"
    expected = _sixteen_bit_png(png)
    decoded = np.asarray(decode(tmp_path, png))
    assert decoded.shape == (24, 32, 3) and decoded.dtype == np.uint8
    for channel in range(3):
        assert np.abs(decoded[..., channel].astype(int) - expected).max() <= 1
    assert (decoded == 255).mean() < 0.01  # clipping made 99.6% of pixels white


def _assert_one_error_line(stderr: str, command: str, message: str) -> None:
    """stderr ends in exactly one ``biformer CMD: error: ...`` line holding ``message``, and has no traceback
    (a line before it may be the untrained-model warning)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert "Traceback" not in stderr and len(errors) == 1 and errors[0] == lines[-1], stderr
    assert lines[-1].startswith(f"biformer {command}: error: ") and message in lines[-1], lines[-1]


# ------------------------------------------------------------------------------------------------
# item 11: inference inputs are bounded before anything of their size is allocated


@pytest.mark.parametrize(
    "argv, message",
    [
        (["visualize", "{thin}", "--output", "{out}"], "aspect ratio 1000:1"),
        (["visualize", "chelsea", "--size", "100000", "--output", "{out}"], "--max-memory-gb"),
        (["visualize", "chelsea", "--size", "2240", "--max-memory-gb", "0.5", "--output", "{out}"],
         "over the limit of 0.5 GB"),
        (["detect", "predict", "{thin}", "--backbone", "biformer_tiny", "--model", "retinanet", "--output", "{out}"],
         "aspect ratio 1000:1"),
        (["detect", "predict", "chelsea", "--backbone", "biformer_tiny", "--model", "retinanet",
          "--max-memory-gb", "0.01", "--output", "{out}"], "over the limit of 0.0 GB"),
        (["segment", "predict", "{thin}", "--backbone", "biformer_tiny", "--output", "{out}"], "aspect ratio 1000:1"),
        (["segment", "predict", "chelsea", "--backbone", "biformer_tiny", "--scale", "100000", "100000",
          "--output", "{out}"], "--max-memory-gb"),
    ],
    ids=["viz_thin", "viz_size_100000", "viz_limit_flag", "detect_thin", "detect_limit_flag", "segment_thin",
         "segment_scale_100000"],
)
def test_item11_inference_size_bounded(tmp_path, capsys, argv, message: str) -> None:
    import resource

    import numpy as np
    from PIL import Image

    from biformer.cli import main

    thin = tmp_path / "thin.png"
    Image.fromarray(np.full((1, 1000, 3), 128, dtype=np.uint8)).save(thin)
    out = tmp_path / "out.png"
    argv = [a.format(thin=thin, out=out) for a in argv]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert main(argv) == 2
    _assert_one_error_line(capsys.readouterr().err, argv[0], message)
    assert not out.exists()
    # refused before allocating: the process grew by well under a gigabyte
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 1_000_000



# ------------------------------------------------------------------------------------------------
# item 13: user errors of visualize, detect and segment end in one error line with status 2


@pytest.fixture
def bad_inputs(tmp_path):
    """Files for the error cases: images that are not images, COCO JSON gone wrong, a corrupt label PNG."""
    import json

    import numpy as np
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "text.png").write_text("not an image")
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    (tmp_path / "truncated.png").write_bytes(whole.read_bytes()[:300])
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "list.json").write_text(json.dumps([coco]))
    (tmp_path / "nocat.json").write_text(json.dumps({**coco, "categories": []}))
    (tmp_path / "broken.json").write_text('{"images": [')
    outside = dict(coco, annotations=[{"id": 9, "image_id": 1, "category_id": 1, "bbox": [60, 50, 10, 10],
                                       "area": 100, "iscrowd": 0}])
    (tmp_path / "outside.json").write_text(json.dumps(outside))
    # a COCO-layout root around each annotation file (what detect train/eval --data take)
    for name in ("list", "nocat", "broken", "outside"):
        root = tmp_path / f"coco_{name}"
        (root / "annotations").mkdir(parents=True)
        for split in ("train", "val"):
            (root / split).mkdir()
            Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / split / "a.png")
            (root / "annotations" / f"instances_{split}.json").write_text((tmp_path / f"{name}.json").read_text())
    # an ADE20K-style folder whose one label PNG is corrupt, and a segmentor checkpoint for it
    for split in ("images", "annotations"):
        (tmp_path / "ade" / split / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "ade" / "images" / "validation" / "a.jpg")
    (tmp_path / "ade" / "annotations" / "validation" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return tmp_path


def _segmentor_checkpoint(path) -> None:
    from biformer.segmentation.models import BUILDERS, save_segmentor

    model = BUILDERS["semantic_fpn"](backbone="biformer_tiny", num_classes=3, n_win=4,
                                     backbone_kwargs={"depths": [1, 1, 1, 1]})
    save_segmentor(path, model, ["a", "b", "c"])


_NO_CKPT = ["--backbone", "biformer_tiny"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["visualize", "{d}/text.png", "--output", "{d}/o.png"], "not an image"),
        (["visualize", "{d}/truncated.png", "--output", "{d}/o.png"], "truncated.png"),
        (["visualize", "{d}/missing.png", "--output", "{d}/o.png"], "missing.png"),
        (["detect", "predict", "{d}/text.png", "--model", "retinanet", *_NO_CKPT], "not an image"),
        (["detect", "predict", "{d}/truncated.png", "--model", "retinanet", *_NO_CKPT], "truncated.png"),
        (["detect", "predict", "{d}/missing.png", "--model", "retinanet", *_NO_CKPT], "missing.png"),
        (["segment", "predict", "{d}/text.png", *_NO_CKPT], "not an image"),
        (["segment", "predict", "{d}/truncated.png", *_NO_CKPT], "truncated.png"),
        (["segment", "predict", "{d}/missing.png", *_NO_CKPT], "missing.png"),
        (["detect", "train", "--data", "{d}/coco_list", "--output", "{d}/run"],
         "instances_train.json' holds a JSON list"),
        (["detect", "train", "--data", "{d}/coco_nocat", "--output", "{d}/run"],
         "defines no categories"),
        (["detect", "eval", "--checkpoint", "{d}/none.safetensors", "--data", "{d}/coco_nocat"],
         "defines no categories"),
        (["detect", "train", "--data", "{d}/coco_broken", "--output", "{d}/run"],
         "instances_train.json' is not valid JSON"),
        (["detect", "eval", "--checkpoint", "{d}/none.safetensors", "--data", "{d}/coco_broken"],
         "instances_val.json' is not valid JSON"),
        (["detect", "train", "--data", "{d}/coco_outside", "--output", "{d}/run"],
         "annotation 9"),
        (["segment", "eval", "--checkpoint", "{d}/seg.safetensors", "--data", "{d}/ade",
          "--no-reduce-zero-label"], "cannot read label PNG"),
        (["detect", "train", "--data", "{d}/coco_list", "--output", "{d}/run",
          "--batch-size", "0"], "--batch-size 0"),
        (["detect", "train", "--data", "{d}/coco_list", "--output", "{d}/run",
          "--min-size", "0"], "--min-size 0"),
        (["detect", "train", "--data", "{d}/coco_list", "--output", "{d}/run",
          "--backbone-kwargs", "[depths"], "--backbone-kwargs"),
        (["detect", "train", "--data", "{d}/coco_list", "--output", "{d}/run", "--num-workers", "-1"],
         "--num-workers -1"),
        (["detect", "predict", "chelsea", "--max-detections", "0"], "--max-detections 0"),
        (["detect", "demo-data", "{d}/demo", "--num-train", "0"], "--num-train 0"),
        (["segment", "train", "--data", "{d}/ade", "--output", "{d}/run", "--batch-size", "-2"], "--batch-size -2"),
        (["segment", "train", "--data", "{d}/ade", "--output", "{d}/run", "--crop-size", "0"], "--crop-size 0"),
        (["segment", "predict", "chelsea", "--scale", "0", "512"], "--scale 0 512"),
        (["visualize", "chelsea", "--size", "-5", "--output", "{d}/o.png"], "--size -5"),
        (["visualize", "chelsea", "--head", "9", "--output", "{d}/o.png"], "got head=9"),
        (["visualize", "chelsea", "--stage", "7", "--output", "{d}/o.png"], "stage"),
    ],
    ids=["viz_not_image", "viz_truncated", "viz_missing", "detect_not_image", "detect_truncated", "detect_missing",
         "segment_not_image", "segment_truncated", "segment_missing", "coco_list", "coco_no_categories_train",
         "coco_no_categories_eval", "coco_malformed_train", "coco_malformed_eval", "box_outside_image",
         "corrupt_label_png", "detect_batch_size_0", "detect_min_size_0", "detect_bad_kwargs_json",
         "detect_workers_negative", "detect_max_detections_0", "detect_demo_num_train_0", "segment_batch_size_negative",
         "segment_crop_size_0", "segment_scale_0", "viz_size_negative", "viz_head_out_of_range", "viz_stage_7"],
)
def test_item13_user_errors_are_one_line(bad_inputs, capsys, monkeypatch, argv, message: str) -> None:
    from biformer.cli import main

    if "{d}/seg.safetensors" in argv:
        _segmentor_checkpoint(bad_inputs / "seg.safetensors")
    monkeypatch.chdir(bad_inputs)  # predict writes its default output here
    argv = [a.replace("{d}", str(bad_inputs)) for a in argv]
    assert main(argv) == 2
    _assert_one_error_line(capsys.readouterr().err, argv[0], message)
    assert not (bad_inputs / "run").exists()  # refused before a run folder was made
