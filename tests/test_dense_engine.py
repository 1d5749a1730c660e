"""Detection and segmentation on the shared engine (biformer.engine.loop), as classification is tested
in test_train.py / test_reliability_train.py: torchrun with 2 gloo processes == 1 process with the
same global batch; SIGKILL mid-epoch then --resume == an uninterrupted run; the run-folder lock,
refusal, --overwrite, a full disk and a diverged loss each give one line and leave the last good state."""
from __future__ import annotations

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from biformer.cli import main as cli_main
from biformer.engine import loop

from .test_train import KILL_AFTER_SAVE  # the same engine, so the same kill

REPO = Path(__file__).resolve().parents[1]
TINY_BACKBONE = '{"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 128], "head_dim": 16}'

# per task: the demo-data command and the train flags of a few-second run (8 images, 4 updates an epoch)
TASKS: Dict[str, Dict[str, List[str]]] = {
    "detect": {
        "demo": ["detect", "demo-data", "{root}", "--num-train", "8", "--num-val", "3"],
        "train": ["--model", "retinanet", "--model-kwargs", '{"fpn_channels": 32}', "--min-size", "64",
                  "--max-size", "96"],
    },
    "segment": {
        "demo": ["segment", "demo-data", "{root}", "--num-train", "8", "--num-val", "2"],
        "train": ["--model", "semantic_fpn", "--model-kwargs", '{"channels": 16, "fpn_channels": 16}',
                  "--crop-size", "64", "--scale", "128", "64"],
    },
}


def env() -> Dict[str, str]:
    # one thread everywhere: another thread count splits float sums differently
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module", params=list(TASKS))
def task_data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    task = request.param
    root = tmp_path_factory.mktemp(task) / "data"
    assert cli_main([a.format(root=root) for a in TASKS[task]["demo"]]) == 0
    return task, root


def train_args(task: str, data: Path, out: Path, *extra: str) -> List[str]:
    """4 updates of 2 images an epoch, 2 epochs."""
    return [task, "train", "--data", str(data), "--output", str(out), "--backbone", "biformer_tiny",
            "--backbone-kwargs", TINY_BACKBONE, "--n-win", "4", *TASKS[task]["train"], "--epochs", "2",
            "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2", "--drop-path", "0.1", "--eval-every", "1",
            "--num-workers", "0", "--log-every", "1", "--no-progress", "--no-tensorboard", *extra]


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_cli(argv: List[str], capsys: pytest.CaptureFixture) -> tuple:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli_main(argv)
    finally:
        torch.set_num_threads(before)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"biformer {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_two_processes_match_one_process_with_the_same_global_batch(task_data: tuple, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """torchrun, 2 CPU processes (gloo) x batch 1 == 1 process x batch 1 x 2 accumulation steps: the same
    loss every update (augmentation and drop path draws included) and the same weights; the sharded
    validation gives figures that `eval` of the saved weights reproduces."""
    task, data = task_data
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(train_args(task, data, one, "--batch-size", "1", "--accum-steps", "2"), capsys)
    assert code == 0, err
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "biformer", *train_args(task, data, two, "--batch-size", "1")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss_one = [float(r["loss"]) for r in read_rows(one / "steps.csv")]
    loss_two = [float(r["loss"]) for r in read_rows(two / "steps.csv")]
    assert len(loss_one) == len(loss_two) == 8  # 8 images / global batch 2, 2 epochs
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4)
    assert len(set(loss_one)) == 8
    w_one, w_two = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    for key in w_one:
        if "running" not in key and "num_batches" not in key:  # BN statistics: averaged over ranks instead
            torch.testing.assert_close(w_two[key], w_one[key], rtol=1e-4, atol=1e-5, msg=key)

    primary = {"detect": "bbox_AP", "segment": "mIoU"}[task]
    final = read_rows(two / "metrics.csv")[-1]
    extra = ["--scale", "128", "64"] if task == "segment" else []
    code, stdout, err = run_cli([task, "eval", "--checkpoint", str(two / "last.safetensors"), "--data", str(data),
                                 "--json", *extra], capsys)
    assert code == 0, err
    import json

    assert json.loads(stdout)[primary] == pytest.approx(float(final[f"val_{primary}"]), abs=1e-4)


def test_resume_after_kill_mid_epoch_gives_the_same_run(task_data: tuple, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """2 epochs straight == SIGKILL after the mid-epoch checkpoint of epoch 2 (update 6) + --resume:
    the same weights, metrics.csv and steps.csv."""
    task, data = task_data
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    recipe = ["--save-every", "3"]  # checkpoints at updates 3 (mid), 4 (end), 6 (mid), 8
    code, _, err = run_cli(train_args(task, data, straight, *recipe), capsys)
    assert code == 0, err
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_SAVE)
    proc = subprocess.run([sys.executable, str(script), "3", *train_args(task, data, killed, *recipe)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = torch.load(killed / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # 0-based epoch in progress, updates done in it
    assert not (killed / "curves.png").exists()
    code, _, err = run_cli([task, "train", "--resume", str(killed), "--num-workers", "0"], capsys)
    assert code == 0, err
    assert "resumed" in err

    expected, got = load_file(straight / "last.safetensors"), load_file(killed / "last.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    rows_a, rows_b = read_rows(straight / "metrics.csv"), read_rows(killed / "metrics.csv")
    assert len(rows_a) == len(rows_b) == 2
    for a, b in zip(rows_a, rows_b):
        for key in a:
            if key not in ("seconds", "img_per_s"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), (a["epoch"], key)
    steps_a, steps_b = read_rows(straight / "steps.csv"), read_rows(killed / "steps.csv")
    assert [r["update"] for r in steps_b] == [r["update"] for r in steps_a] == [str(u) for u in range(1, 9)]
    assert [float(r["loss"]) for r in steps_b] == pytest.approx([float(r["loss"]) for r in steps_a], rel=1e-6)


def test_a_cpu_run_sets_its_threads_as_classification_does(task_data: tuple, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the run chooses its intra-op threads, leaving its data workers' cores free (engine/threads.py)."""
    from biformer.engine import threads

    calls: List[tuple] = []
    monkeypatch.setattr(threads, "configure_cpu_threads", lambda *args: calls.append(args))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    task, data = task_data
    code, _, err = run_cli(train_args(task, data, tmp_path / "run", "--epochs", "1", "--device", "cpu",
                                      "--num-workers", "1"), capsys)
    assert code == 0, err
    assert calls == [(1, 1)]


# ---- the run folder and bad input ------------------------------------------------------------------


def test_a_run_folder_is_refused_unless_resumed_or_overwritten(task_data: tuple, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    task, data = task_data
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(task, data, out, "--epochs", "1"), capsys)
    assert code == 0, err
    before = (out / "last.safetensors").read_bytes()
    code, _, err = run_cli(train_args(task, data, out, "--epochs", "1"), capsys)
    assert code == 2
    one_error_line(err, task, str(out), "--resume", "--overwrite")
    assert (out / "last.safetensors").read_bytes() == before
    # a finished run resumes to nothing new; --overwrite starts again
    code, _, err = run_cli([task, "train", "--resume", str(out)], capsys)
    assert code == 0 and "resumed" in err, err
    code, _, err = run_cli(train_args(task, data, out, "--epochs", "1", "--overwrite", "--seed", "1"), capsys)
    assert code == 0 and "--overwrite: removing" in err, err
    assert (out / "last.safetensors").read_bytes() != before
    code, _, err = run_cli([task, "train", "--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2
    one_error_line(err, task, "nothing")


def test_disk_full_keeps_the_last_state_and_resumes(task_data: tuple, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC in the second write of state.pt: one line naming the folder and --resume; the first
    state stays whole (no temporary left); after "freeing space" --resume finishes the run."""
    task, data = task_data
    out = tmp_path / "run"
    original = torch.save
    saves: List[str] = []

    def save_or_fail(obj: object, f: str, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and obj.get("format") == loop.STATE_FORMAT:
            saves.append(str(f))
            if len(saves) == 2:
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_or_fail)
    code, _, err = run_cli(train_args(task, data, out), capsys)
    monkeypatch.undo()
    assert code == 2
    one_error_line(err, task, "no space left", str(out), "--resume")
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".state.pt")) == []
    code, _, err = run_cli([task, "train", "--resume", str(out)], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in read_rows(out / "metrics.csv")] == ["1", "2"]


def test_a_diverged_loss_stops_with_one_line_and_keeps_the_last_good_state(
        task_data: tuple, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    task, data = task_data
    out = tmp_path / "run"
    original = loop.Engine.train_epoch

    def poison_second_epoch(self: loop.Engine) -> None:
        if self.state.epoch == 1:  # NaN weights: every later loss is NaN
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        original(self)

    monkeypatch.setattr(loop.Engine, "train_epoch", poison_second_epoch)
    code, _, err = run_cli(train_args(task, data, out), capsys)
    assert code == 2
    one_error_line(err, task, "diverged at update 5", "keeps the last good state (update 4)", "--lr")
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("argv, needle", [
    (["train", "--output", "{t}/run"], "--data"),
    (["train", "--data", "{t}/missing", "--output", "{t}/run"], "missing"),
    (["train", "--data", "{d}", "--output", "{t}/run", "--batch-size", "100"], "fewer than one global batch"),
    (["train", "--data", "{d}", "--output", "{t}/run", "--accum-steps", "0"], "--accum-steps 0"),
    (["train", "--data", "{d}", "--output", "{t}/run", "--sync-bn", "--resume", "{t}/run"], "--resume"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(task_data: tuple, tmp_path: Path, argv: List[str],
                                                           needle: str, capsys: pytest.CaptureFixture) -> None:
    task, data = task_data
    args = [a.format(t=tmp_path, d=data) for a in argv]
    if "--batch-size" in args:
        args = train_args(task, data, tmp_path / "run", "--batch-size", "100")[1:]
    code, _, err = run_cli([task, *args], capsys)
    assert code == 2, err
    one_error_line(err, task, needle)
    leftovers = [p.name for p in (tmp_path / "run").iterdir()] if (tmp_path / "run").exists() else []
    assert set(leftovers) <= {".lock"}, leftovers
