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
    from biformer.backbone import load_image

    return load_image(png)


def _decode_viz(tmp_path, png):
    from biformer.viz.images import load_image

    return load_image(png)


def _decode_train_folder(tmp_path, png):
    from biformer.train.data import open_source

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
