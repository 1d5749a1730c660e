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
