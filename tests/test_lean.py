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


HEAVY = ("torch", "timm", "matplotlib", "torchvision")

# Run as the installed `biformer` script is (a file of that name, so biformer/__init__.py defers its torch
# import): --help of every command in COMMANDS and of every action of the task commands, in one process,
# checking after each that nothing heavy was imported.
EVERY_HELP = """
import argparse, importlib, sys
from biformer.cli import COMMANDS, main

def help_of(argv):
    try:
        main([*argv, "--help"])
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
    loaded = [m for m in {heavy!r} if m in sys.modules]
    assert not loaded, (argv, loaded)

main(["--help"])
checked = []
for name, (module, _) in COMMANDS.items():
    help_of([name])
    checked.append(name)
    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    for sub in [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]:
        for action in sub.choices:
            help_of([name, action])
            checked.append(name + " " + action)
print("checked:", ", ".join(checked))
"""


def test_no_help_imports_torch(tmp_path: Path) -> None:
    script = tmp_path / "biformer"
    script.write_text(EVERY_HELP.format(heavy=HEAVY))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checked = proc.stdout.rsplit("checked: ", 1)[1].strip().split(", ")
    for task in ("classify", "detect", "segment"):
        assert [c for c in checked if c.startswith(task + " ")] == [f"{task} {a}" for a in ACTIONS], checked
    assert {"convert", "bench", "push-to-hub", "explore", "ablate", "train", "eval", "predict"} <= set(checked)


ACTIONS = ("train", "eval", "predict", "demo-data")


@pytest.mark.parametrize("argv", [[], ["detect", "train"]], ids=lambda a: " ".join(a) or "top-level")
def test_help_of_python_m_biformer_does_not_import_torch(argv: List[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "biformer", *argv, "--help"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_classify_help_lists_its_four_actions() -> None:
    proc = subprocess.run([sys.executable, "-m", "biformer", "classify", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("ACTION\n", 1)[1].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == list(ACTIONS), proc.stdout


def test_the_names_commands_show_without_importing_agree_with_their_modules() -> None:
    """--help lists these names without importing the modules that define them; they must agree."""
    from biformer.ablate import MIXERS, cli as ablate_cli
    from biformer.bench import cli as bench_cli, runner, runtimes, suites, table
    from biformer.detection import BUILDERS as DETECTORS, cli as detect_cli
    from biformer.segmentation import BUILDERS as SEGMENTORS, cli as segment_cli
    from biformer.viz import cli_explore, explore

    assert ablate_cli.MIXERS == tuple(MIXERS)
    assert (bench_cli.PARTS, bench_cli.TABLES, bench_cli.MODELS) == (runner.PARTS, table.TABLES, suites.MODELS)
    assert bench_cli.AMP_NAMES == tuple(sorted(runtimes.AMP_DTYPES))
    assert detect_cli.MODELS == tuple(sorted(DETECTORS)) and segment_cli.MODELS == tuple(sorted(SEGMENTORS))
    assert cli_explore.DEFAULT_ATTENTION_MB == explore.DEFAULT_ATTENTION_MB


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
