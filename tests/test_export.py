"""ONNX export of BiFormer-T through torch.export, checked in ONNX Runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.export import Dim

import biformer  # noqa: F401 - registers the models

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow
def test_onnx_export_of_biformer_tiny_matches_pytorch_in_onnx_runtime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny").eval()
    example = torch.randn(2, 3, 224, 224)
    path = tmp_path / "biformer_tiny.onnx"
    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # a batch other than the traced one: the batch axis is dynamic
        x = torch.randn(batch, 3, 224, 224)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (batch, 1000)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # the dynamo export of the full biformer_tiny; the default suite checks a small one in test_bench.py
def test_deploy_recipe_onnx_runtime_matches_pytorch_within_1e4_relative(tmp_path: Path) -> None:
    """docs/deploy.md's recipe (biformer.bench.runtimes): export with a dynamic batch, run in ORT with
    a set thread count; the logits agree with PyTorch's to 1e-4 of their scale, at every batch."""
    from biformer.bench.runtimes import export_onnx, ort_session, relative_difference

    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=10).eval()
    path = tmp_path / "biformer_tiny.onnx"
    export_onnx(model, torch.randn(2, 3, 112, 112), str(path))
    session = ort_session(str(path), threads=2)
    assert session.get_session_options().intra_op_num_threads == 2
    (batch_axis,) = [d for d in session.get_inputs()[0].shape[:1]]
    assert isinstance(batch_axis, str)  # symbolic: one file for every batch size
    for batch in (1, 3):
        x = torch.randn(batch, 3, 112, 112)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert got.shape == (batch, 10)
        assert relative_difference(torch.from_numpy(got), expected) < 1e-4
