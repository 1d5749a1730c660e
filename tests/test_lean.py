"""The lean install: the core works without the extras, a missing extra is named in one line, and
``--help`` does not load torch. Also the CPU thread choice and progress output in a redirected log."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parents[1]

# every optional dependency of the extras (train, viz, dense, analysis, bench, export)
EXTRAS_MODULES = ["matplotlib", "sklearn", "skimage", "fvcore", "tensorboard", "pycocotools", "tqdm", "onnx",
                  "onnxruntime", "onnxscript"]

# A module set to None in sys.modules cannot be imported (ModuleNotFoundError), and find_spec reports it
# absent, as it would be in a venv without the extra.
BLOCKER = """
import sys
sys.modules.update(dict.fromkeys({blocked!r}))
"""


def run_python(code: str, blocked: List[str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` raises ImportError."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=sorted(blocked)) + code, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_the_core_runs_without_any_extra() -> None:
    code = """
import torch, timm, biformer
bra = biformer.BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=2)
assert bra(torch.randn(1, 32, 9, 11)).shape == (1, 32, 9, 11)
model = timm.create_model("biformer_tiny", num_classes=3).eval()
with torch.no_grad():
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in {blocked!r})
assert not loaded, loaded
print("core ok")
""".format(blocked=EXTRAS_MODULES)
    proc = run_python(code, EXTRAS_MODULES)
    assert proc.returncode == 0, proc.stderr
    assert "core ok" in proc.stdout


@pytest.mark.parametrize("argv, blocked, extra", [
    (["visualize", "astronaut", "--output", "OUT/r.png"], ["matplotlib"], "viz"),
    (["flops", "biformer_tiny"], ["fvcore"], "analysis"),
])
def test_a_missing_extra_is_named_in_one_line(tmp_path: Path, argv: List[str], blocked: List[str], extra: str) -> None:
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    code = "from biformer.cli import main; raise SystemExit(main(sys.argv[1:]))"
    proc = run_python(code, blocked, *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert f'pip install "biformer[{extra}]"' in lines[0] and blocked[0] in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_require_keeps_the_traceback_of_a_broken_dependency(monkeypatch) -> None:
    """An extra that is installed but fails on its own import is a bug to see, not a missing extra."""
    from biformer._extras import MissingExtraError, require

    def broken(name: str, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'libfoo'", name="libfoo")

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(ModuleNotFoundError) as info:
        require("matplotlib", extra="viz")
    assert not isinstance(info.value, MissingExtraError)


# commands whose --help must not import torch (convert, bench, push-to-hub, explore, detect and segment
# still import it at module level)
LEAN_HELP = [[], ["train"], ["eval"], ["predict"], ["flops"], ["complexity"], ["visualize"]]


@pytest.mark.parametrize("argv", LEAN_HELP, ids=lambda a: " ".join(a) or "top-level")
def test_help_does_not_import_torch(argv: List[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "biformer", *argv, "--help"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "timm", "matplotlib", "torchvision"}, sorted(imported & {"torch", "timm"})


def test_visualize_names_the_bundled_images_without_loading_them() -> None:
    from biformer.viz import cli, images

    assert cli.BUNDLED_IMAGES == images.BUNDLED_IMAGES


def test_threads_leave_room_for_workers_and_busy_cores(monkeypatch) -> None:
    from biformer.engine import threads

    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    assert threads.intra_op_threads(num_workers=0, busy=0) == 8
    assert threads.intra_op_threads(num_workers=2, busy=0) == 6
    assert threads.intra_op_threads(num_workers=0, busy=3) == 5       # cores other processes hold
    assert threads.intra_op_threads(num_workers=0, local_world_size=2, busy=0) == 4
    assert threads.intra_op_threads(num_workers=8, busy=20) == 1       # never below one
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    assert threads.intra_op_threads(num_workers=0, busy=1) == 1       # a busy-loop beside a 2-core job


def test_the_cli_sets_passive_openmp_waits_before_torch_loads(monkeypatch) -> None:
    from biformer.engine import threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "5")  # a user's choice is kept
    threads.set_openmp_passive()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["KMP_BLOCKTIME"] == "5"


def test_a_redirected_log_has_no_progress_bar_flood(tmp_path: Path) -> None:
    """`biformer train` with its output in a file: one line per epoch, no carriage-return updates."""
    from tests.test_train import TINY_MODEL

    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["train", "--output", str(tmp_path / "run"), "--model-kwargs", TINY_MODEL, "--epochs", "2",
            "--warmup-epochs", "1", "--log-interval", "1", "--no-tensorboard"]  # progress bars left on
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "biformer", *args], stdout=f, stderr=subprocess.STDOUT,
                              timeout=600, env=env, cwd=tmp_path)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    assert text.count("\n") <= 15, text
    assert text.count("epoch 2/2") >= 1
