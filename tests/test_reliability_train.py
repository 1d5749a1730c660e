"""Issue 13 (training, evaluation, checkpoints, CLI): nothing lost, nothing silent.

One test per numbered item of the issue; the data-loss ones run real processes. Runs use the tiny
folder setup of test_train.py (a few seconds each)."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import biformer  # noqa: F401  (registers the models)
from biformer.checkpoint import CheckpointError, load_model, save_model
from biformer.cli import main as cli_main
from biformer.errors import UserValueError
from biformer.classification import training
from biformer.engine import loop

from .test_train import CLASSES, REPO, TINY_MODEL, make_folder, read_rows, run_cli, same_threads_env, tiny_args

TINY_KWARGS = dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 32, 32], head_dim=16, n_win=2, topks=[1, 2, 2, None])


def subprocess_env() -> Dict[str, str]:
    """This checkout first on the path, and this process's thread count (see same_threads_env)."""
    return same_threads_env(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def error_lines(err: str, command: str) -> List[str]:
    return [line for line in err.splitlines() if line.startswith(f"biformer {command}: error:")]


def assert_one_error_line(err: str, command: str, *needles: str, only_line: bool = True) -> str:
    """Exactly one ``biformer CMD: error:`` line holding every needle, no traceback; with
    ``only_line`` nothing else on stderr either."""
    lines = error_lines(err, command)
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    if only_line:
        assert [line for line in err.splitlines() if line.strip()] == lines, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tiny_checkpoint(path: Path, metadata: Dict[str, str] | None = None, num_classes: int = 3,
                    damage: Callable[[torch.nn.Module], None] | None = None) -> Path:
    """A tiny BiFormer in our format (img 32 preprocessing, the test classes)."""
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", num_classes=num_classes, **TINY_KWARGS)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    if damage is not None:
        damage(model)
    save_model(path, model, "biformer_tiny", {"num_classes": num_classes, **TINY_KWARGS},
               {"class_names": json.dumps(list(CLASSES)), **(metadata or {})})
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """(data, run folder) of a finished 1-epoch tiny run; tests copy the folder before changing it."""
    root = tmp_path_factory.mktemp("finished")
    data = make_folder(root / "data")
    assert cli_main(tiny_args(data, root / "run", "--epochs", "1")) == 0
    return data, root / "run"


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


# ---- data loss ---------------------------------------------------------------------------------

HOLD_THE_FOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from biformer.engine import loop
    from biformer.cli import main

    release = Path(sys.argv[1])
    original = loop.Engine.fit

    def fit_when_released(self):
        # the folder is locked before the engine is built: hold it until the test lets go
        deadline = time.time() + 240
        while not release.exists() and time.time() < deadline:
            time.sleep(0.05)
        return original(self)

    loop.Engine.fit = fit_when_released
    sys.exit(main(sys.argv[2:]))
""")


# `python -m biformer ARGS`, started at once but entering only once the folder is held, so both
# processes pay their imports at the same time
TRAIN_WHEN_HELD = textwrap.dedent("""
    import json, runpy, sys, time
    from pathlib import Path
    import biformer.cli, biformer.classification.training  # noqa: F401  (the imports, before waiting)

    lock, holder = Path(sys.argv[1]), int(sys.argv[2])
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if json.loads(lock.read_text()).get("pid") == holder:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    sys.argv = ["biformer", *sys.argv[3:]]
    runpy.run_module("biformer", run_name="__main__", alter_sys=True)
""")


def _wait_for_lock_holder(lock: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(lock.read_text()).get("pid") == proc.pid:
                return
        time.sleep(0.1)
    raise AssertionError(f"{lock} never named pid {proc.pid}")


def test_item01_two_runs_on_one_output_folder(tmp_path: Path) -> None:
    """Two real `biformer train` processes on one --output: the second, entering while the first
    holds the folder, exits 2 with one line naming the folder and the holder; the first finishes
    with only its own results."""
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    script = tmp_path / "hold.py"
    script.write_text(HOLD_THE_FOLDER)
    release = tmp_path / "release"
    argv = tiny_args(data, out)
    (tmp_path / "second.py").write_text(TRAIN_WHEN_HELD)
    first = subprocess.Popen([sys.executable, str(script), str(release), *argv], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    second = subprocess.Popen([sys.executable, str(tmp_path / "second.py"), str(out / ".lock"), str(first.pid), *argv],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        _wait_for_lock_holder(out / ".lock", first)
        _, second_err = second.communicate(timeout=300)
        release.write_text("")
        _, first_err = first.communicate(timeout=300)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert second.returncode == 2, second_err[-3000:]
    assert_one_error_line(second_err, "train", str(out), f"pid {first.pid}", socket.gethostname(), "in use")
    assert first.returncode == 0, first_err[-3000:]
    # the first run's own results, not interleaved with another's
    assert [int(r["update"]) for r in read_rows(out / "steps.csv")] == [1, 2, 3, 4, 5, 6]
    assert [int(r["epoch"]) for r in read_rows(out / "metrics.csv")] == [1, 2]
    assert (out / ".lock").read_text() == ""  # released on exit; a later run is refused by item 2's check


def test_item02_results_without_state_are_not_replaced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A folder holding best.safetensors but no state.pt is refused by a new run (naming the file
    and the ways on); --overwrite says what it removes, then runs."""
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    good = tiny_checkpoint(out / "best.safetensors", {"val_top1": "95.2800"})
    before = good.read_bytes()
    code, _, err = run_cli(tiny_args(data, out, "--epochs", "1"), capsys)
    assert code == 2
    assert_one_error_line(err, "train", str(out), "best.safetensors", "--resume", "--overwrite")
    assert good.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best.safetensors"]

    code, _, err = run_cli(tiny_args(data, out, "--epochs", "1", "--overwrite"), capsys)
    assert code == 0, err
    assert "--overwrite: removing the previous run's best.safetensors" in err
    assert good.read_bytes() != before


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from biformer.engine import loop
    from biformer.cli import main

    kill_at = int(sys.argv[1])
    original = torch.save
    saves = []

    def save_half_then_die(obj, f, *args, **kwargs):
        original(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("format") == loop.STATE_FORMAT:
            saves.append(f)
            if len(saves) == kill_at:  # half of the temporary is on disk: as a kill mid-write
                os.truncate(f, os.path.getsize(f) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
    sys.exit(main(sys.argv[2:]))
""")


def test_item03_kill_during_a_save_leaves_no_temporary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIGKILL while state.pt's temporary is half-written (a real process): the temporary and the
    lock are left behind; --resume reports the dead holder, removes the temporary and finishes."""
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_SAVE)
    proc = subprocess.run([sys.executable, str(script), "2", *tiny_args(data, out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == -9, proc.stderr[-3000:]
    leftovers = sorted(p.name for p in out.glob(".state.pt.*.tmp"))
    assert len(leftovers) == 1 and (out / leftovers[0]).stat().st_size > 0
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1  # the first save is whole
    dead_pid = json.loads((out / ".lock").read_text())["pid"]

    code, _, err = run_cli(["train", "--resume", str(out), "--num-workers", "0"], capsys)
    assert code == 0, err
    assert f"a run with pid {dead_pid} on host {socket.gethostname()} stopped without releasing" in err
    assert "removed 1 temporary file(s) of an interrupted save" in err and leftovers[0] in err
    assert not list(out.glob(".*.tmp"))
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[None]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "test_item04_disk_full_injected covers the same with an injected ENOSPC")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Write a file until the file system is full."""
    filler = folder / "filler"
    chunk = b"\0" * (64 << 10)
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
                f.flush()
    with contextlib.suppress(OSError):  # the last partial page
        with open(folder / "filler2", "wb") as f:
            while True:
                f.write(b"\0" * 512)
                f.flush()
    return filler


def _assert_disk_full_then_resume(out: Path, err: str, code: int, capsys: pytest.CaptureFixture,
                                  free_space: Callable[[], None]) -> None:
    assert code == 2, err
    line = assert_one_error_line(err, "train", "no space left on device", str(out), "--resume", only_line=False)
    assert "inline_container" not in line or "no space left" in line
    state = torch.load(out / "state.pt", weights_only=True)  # the last good state is whole
    assert state["epoch"] == 1
    assert not list(out.glob(".*.tmp"))
    free_space()
    code, _, err = run_cli(["train", "--resume", str(out)], capsys)
    assert code == 0, err
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2


def test_item04_disk_full_on_a_small_filesystem(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A real 16 MB tmpfs filled after the first checkpoint: the run stops with one line saying
    'no space left on device' and naming the folder; state.pt of epoch 1 still loads, and once
    space is freed --resume finishes the run."""
    data = make_folder(tmp_path / "data")
    small = tmp_path / "small"
    with small_filesystem(small, "16m"):
        out = small / "run"
        original = loop.Engine.save_state
        filled: List[Path] = []

        def save_then_fill(self: loop.Engine) -> None:
            original(self)
            if not filled:
                filled.append(_fill(small))

        monkeypatch.setattr(loop.Engine, "save_state", save_then_fill)
        code, _, err = run_cli(tiny_args(data, out), capsys)
        monkeypatch.undo()

        def free_space() -> None:
            for name in ("filler", "filler2"):
                (small / name).unlink(missing_ok=True)

        _assert_disk_full_then_resume(out, err, code, capsys, free_space)


def test_item04_disk_full_injected(tmp_path: Path, capsys: pytest.CaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with OSError(ENOSPC) injected into the second write of state.pt."""
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    original = torch.save
    state_saves: List[str] = []

    def save_or_fail(obj: object, f: str, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and obj.get("format") == loop.STATE_FORMAT:
            state_saves.append(str(f))
            if len(state_saves) == 2:
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_or_fail)
    code, _, err = run_cli(tiny_args(data, out), capsys)
    monkeypatch.undo()
    _assert_disk_full_then_resume(out, err, code, capsys, lambda: None)


# ---- silent wrong results ------------------------------------------------------------------------


def test_item08_nan_logits_give_no_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """eval of a checkpoint with NaN outputs refuses to report a top-1, naming how many images;
    training's validation records no accuracy and no best.safetensors from NaN logits."""
    data = make_folder(tmp_path / "data")
    ckpt = tiny_checkpoint(tmp_path / "nan.safetensors", damage=lambda m: torch.nn.init.constant_(m.head.bias, math.nan))
    code, stdout, err = run_cli(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--num-workers", "0"], capsys)
    assert code == 2 and "top-1" not in stdout
    assert_one_error_line(err, "eval", "6 of 6 images gave non-finite logits", str(ckpt))

    original = training.ClassificationTask.evaluate

    def evaluate_nan(self: training.ClassificationTask, model: torch.nn.Module, runtime: object) -> Dict[str, float]:
        hook = model.register_forward_hook(lambda module, args, output: output * math.nan)
        try:
            return original(self, model, runtime)
        finally:
            hook.remove()

    monkeypatch.setattr(training.ClassificationTask, "evaluate", evaluate_nan)
    out = tmp_path / "run"
    code, _, err = run_cli(tiny_args(data, out, "--epochs", "1"), capsys)
    assert code == 0, err
    assert "warning: epoch 1: 6 of 6 val images gave non-finite logits" in err
    assert not (out / "best.safetensors").exists() and (out / "last.safetensors").exists()
    row = read_rows(out / "metrics.csv")[0]
    assert math.isnan(float(row["val_top1"])) and row["best_top1"] == ""  # no best yet


def test_item09_one_class_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Training data of one class (plus a class folder without images) trains, with one warning
    line for each at the start."""
    data = make_folder(tmp_path / "data")
    for split in ("train", "val"):
        shutil.rmtree(data / split / "fox")
        shutil.rmtree(data / split / "dog")
    (data / "train" / "dog").mkdir()  # a class folder without images
    code, _, err = run_cli(tiny_args(data, tmp_path / "run", "--epochs", "1"), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert "only 1 class (cat)" in warnings[0] and "accuracy to 100%" in warnings[0]
    assert "1 class(es) have no training images: dog" in warnings[1]


def test_item10_convert_keeps_our_metadata(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tiny_checkpoint(tmp_path / "best.safetensors", {"epoch": "7", "val_top1": "71.9400", "weights": "ema"})
    dst = tmp_path / "converted.safetensors"
    code, _, err = run_cli(["convert", str(src), str(dst)], capsys)
    assert code == 0, err
    with safe_open(str(src), framework="pt") as f:
        before = f.metadata()
    with safe_open(str(dst), framework="pt") as f:
        after = f.metadata()
    assert json.loads(after["class_names"]) == list(CLASSES)
    assert (after["epoch"], after["val_top1"], after["weights"]) == ("7", "71.9400", "ema")
    assert after == before


# ---- unbounded resources -----------------------------------------------------------------------

_GOOD = {"format": "biformer", "model_name": "biformer_tiny",
         "model_kwargs": json.dumps({"num_classes": 3, **TINY_KWARGS}), "pretrained_cfg": "{}"}


@pytest.mark.parametrize("change, field", [
    ({"model_name": "resnet50"}, "'model_name' is 'resnet50'"),
    ({"model_name": None}, "no 'model_name'"),
    ({"model_kwargs": json.dumps({"pretrained": True, "pretrained_cfg_overlay": {"file": "/etc/passwd"}})},
     "'model_kwargs.pretrained'"),
    ({"model_kwargs": json.dumps({"num_classes": 10 ** 9})}, "'model_kwargs.num_classes' is 1000000000"),
    ({"model_kwargs": json.dumps({"drop_rate": 1.5})}, "'model_kwargs.drop_rate' is 1.5"),
    ({"model_kwargs": json.dumps({"depths": [64] * 4, "embed_dims": [4096] * 4})}, "parameters, expected at most"),
    ({"model_kwargs": "{not json"}, "'model_kwargs' is not valid JSON"),
    ({"model_kwargs": "[1, 2]"}, "'model_kwargs' is a list"),
    ({"model_kwargs": json.dumps({"n_win": "7"})}, "'model_kwargs.n_win' is 7"),
    ({"pretrained_cfg": json.dumps({"file": "/etc/passwd"})}, "'pretrained_cfg.file' is not accepted"),
    ({"pretrained_cfg": json.dumps({"input_size": [3, 10 ** 6, 10 ** 6]})}, "'pretrained_cfg.input_size'"),
], ids=["other-model", "no-name", "pretrained-path", "huge-head", "drop-rate", "huge-model", "bad-json",
        "kwargs-list", "wrong-type", "cfg-file", "huge-input"])
def test_item12_checkpoint_metadata_is_checked(tmp_path: Path, change: Dict[str, object], field: str) -> None:
    """Metadata naming another model, unknown or out-of-range kwargs, or malformed JSON is a
    CheckpointError (a UserValueError) naming the field, before anything is built."""
    model = timm.create_model("biformer_tiny", num_classes=3, **TINY_KWARGS)
    metadata = {k: v for k, v in {**_GOOD, **change}.items() if v is not None}
    path = tmp_path / "crafted.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="metadata") as info:
        load_model(path)
    assert isinstance(info.value, UserValueError)
    assert field in str(info.value) and str(path) in str(info.value)


# ---- raw tracebacks for user errors ------------------------------------------------------------


def _read_only_folder(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on a read-only tmpfs, or, where mounting is not allowed, mkdir made to fail with EROFS."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        real_mkdir = Path.mkdir

        def mkdir(self: Path, *args: object, **kwargs: object) -> None:
            if self.is_relative_to(ro):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(ro)], check=False))
    return ro / "run"


def _random_bytes(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


def _crafted(path: Path, **change: str) -> Path:
    model = timm.create_model("biformer_tiny", num_classes=3, **TINY_KWARGS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={**_GOOD, **change})
    return path


def _killed_before_first_checkpoint(run: Path, dst: Path) -> Path:
    """A run folder as kill -9 before the first checkpoint leaves it: config, lock naming the dead run."""
    dst.mkdir()
    shutil.copy(run / "config.yaml", dst / "config.yaml")
    (dst / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname()}))
    return dst


# case -> (argv builder, command, words the one error line must hold, whether it is stderr's only line)
CASES: Dict[str, Tuple[Callable[..., List[str]], str, Sequence[str], bool]] = {
    "bad-yaml": (lambda t, d, r, **_: ["train", "--config", str(_write(t / "bad.yaml", "epochs: [1, 2\n")),
                                       "--output", str(t / "o")],
                 "train", ["bad.yaml", "not valid YAML", "line"], True),
    "unknown-model": (lambda t, d, r, **_: tiny_args(d, t / "o", "--model", "nonexistent"),
                      "train", ["model='nonexistent'", "biformer_tiny"], True),
    "output-is-a-file": (lambda t, d, r, **_: tiny_args(d, _write(t / "afile", "x")),
                         "train", ["afile", "is a file"], True),
    "output-read-only": (lambda t, d, r, request, monkeypatch: tiny_args(d, _read_only_folder(t, request, monkeypatch)),
                         "train", ["ro/run", "read-only"], True),
    "corrupt-state": (lambda t, d, r, **_: ["train", "--resume", str(_damage_state(copy_run(r, t / "c")))],
                      "train", ["state.pt", "damaged", "--overwrite"], True),
    "convert-to-dir": (lambda t, d, r, **_: ["convert", str(r / "last.safetensors"), str(t)],
                       "convert", ["which is a directory"], True),
    "lr-inf": (lambda t, d, r, **_: tiny_args(d, t / "o", "--lr", "inf"),
               "train", ["diverged at update", "(loss ", "no training state had been saved"], False),
    "predict-batch-0": (lambda t, d, r, **_: ["predict", str(d / "val"), "--checkpoint", str(r / "last.safetensors"),
                                              "--batch-size", "0"],
                        "predict", ["--batch-size 0", "positive"], True),
    "eval-workers-negative": (lambda t, d, r, **_: ["eval", "--checkpoint", str(r / "last.safetensors"),
                                                    "--num-workers", "-1"],
                              "eval", ["--num-workers -1"], True),
    "random-pth": (lambda t, d, r, **_: ["eval", "--checkpoint", str(_random_bytes(t / "rand.pth")), "--data", str(d)],
                   "eval", ["rand.pth", "weights_only=True"], True),
    "bad-json-kwargs": (lambda t, d, r, **_: ["eval", "--checkpoint", str(_crafted(t / "k.safetensors",
                                                                                 model_kwargs="{oops")), "--data", str(d)],
                        "eval", ["k.safetensors", "model_kwargs", "not valid JSON"], True),
    "bad-json-classes": (lambda t, d, r, **_: ["eval", "--checkpoint", str(_crafted(t / "n.safetensors",
                                                                                  class_names="[\"cat\",")),
                                               "--data", str(d)],
                         "eval", ["n.safetensors", "class_names", "not valid JSON"], True),
    "killed-before-checkpoint": (lambda t, d, r, **_: ["train", "--resume", str(_killed_before_first_checkpoint(r, t / "k"))],
                                 "train", ["no training state to resume", "--overwrite", "another --output"], False),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _damage_state(run: Path) -> Path:
    (run / "state.pt").write_bytes(os.urandom(2048))
    return run


@pytest.mark.parametrize("case", list(CASES))
def test_item13_user_errors_are_one_line(case: str, finished_run: Tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture, request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bad input ends in exit 2 and one `biformer CMD: error: ...` line naming the offending
    value; never a traceback, never torch's advice to load with weights_only=False."""
    data, run = finished_run
    build, command, needles, only_line = CASES[case]
    argv = build(tmp_path, data, run, request=request, monkeypatch=monkeypatch)
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert_one_error_line(err, command, *needles, only_line=only_line)
    assert "weights_only=False" not in err and "will likely succeed" not in err
    if case == "killed-before-checkpoint":  # the dead holder is reported, the stale lock not stolen silently
        assert "stopped without releasing" in err


def test_item13_programming_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only UserError becomes one line: a bug (here a ZeroDivisionError, or a plain ValueError)
    propagates with its traceback."""
    from biformer.classification import cli_eval

    def broken(args: object) -> int:
        return 1 // 0

    monkeypatch.setattr(cli_eval, "run", broken)
    with pytest.raises(ZeroDivisionError):
        cli_main(["eval", "--checkpoint", "x.safetensors"])

    def plain_value_error(args: object) -> int:
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(cli_eval, "run", plain_value_error)
    with pytest.raises(ValueError, match="a bug"):
        cli_main(["eval", "--checkpoint", "x.safetensors"])
