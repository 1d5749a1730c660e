from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest
import torch

# Under `pytest -n N` each worker keeps to one thread, so the workers do not oversubscribe the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
# The CLI picks CPU threads itself unless OMP_NUM_THREADS is set: a command run inside a test keeps
# this process's count, so its results compare with the test's own.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def reference_file(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():  # fail, never skip: parity with the original must not silently drop out
        pytest.fail(f"reference data {path} is missing; the tests expect ../shared/reference beside the repo")
    return path


def original_state_dict(variant: str, device: str = "cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state_dict in the original implementation's names and shapes, from the reference key list.

    Values are small random numbers (positive for BatchNorm variances) so the model runs sanely.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for line in reference_file(f"official_biformer_{variant}_keys.tsv").read_text().splitlines()[1:]:
        key, shape_text = line.split("\t")
        shape = tuple(int(s) for s in shape_text.split("x")) if shape_text else ()
        if device == "meta":
            state[key] = torch.empty(shape, device="meta", dtype=torch.long if not shape else torch.float32)
        elif not shape:
            state[key] = torch.tensor(7)
        elif "running_var" in key:
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    return state
