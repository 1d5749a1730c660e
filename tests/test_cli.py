"""One grammar for every command: the task commands (classify, detect, segment) with the same actions,
demo-data that never overwrites, and the same option names for the same things."""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from biformer.cli import COMMANDS
from biformer.cli import main as cli_main

TINY_DIGITS = "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 64, 128], head_dim: 16, n_win: 2, topks: [2, 2, 2, null]}"


def run_cli(argv: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_demo_data_is_an_image_folder_that_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "digits"
    root.mkdir()  # an empty folder is as good as a new one
    code, out, err = run_cli(["classify", "demo-data", str(root), "--num-train", "20", "--num-val", "10"], capsys)
    assert code == 0, err
    assert f"classify train --data {root}" in out
    for split, count in (("train", 20), ("val", 10)):
        assert sorted(p.name for p in (root / split).iterdir()) == [str(d) for d in range(10)]  # every digit
        assert len(list((root / split).rglob("*.png"))) == count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no temporary folder left beside it

    out_dir = tmp_path / "run"
    code, _, err = run_cli(["classify", "train", "--data", str(root), "--preset", "digits", "--epochs", "1",
                            "--batch-size", "10", "--model-kwargs", TINY_DIGITS, "--output", str(out_dir),
                            "--no-progress", "--no-tensorboard"], capsys)
    assert code == 0, err
    assert len((out_dir / "metrics.csv").read_text().splitlines()) == 2  # header and one epoch
    # the shorthand reads the same folder and checkpoint
    code, out, err = run_cli(["eval", "--checkpoint", str(out_dir / "best.safetensors"), "--data", str(root),
                              "--num-workers", "0", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["num_images"] == 10 and sorted(report["per_class"]) == [str(d) for d in range(10)]


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_demo_data_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture, task: str) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    code, out, err = run_cli([task, "demo-data", str(root), "--num-train", "2", "--num-val", "1"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == (f"biformer {task}: error: got ROOT {str(root)!r}, which is not empty; expected a new "
                           "or empty folder (demo-data never overwrites)")
    assert [p.name for p in root.iterdir()] == ["notes.txt"] and (root / "notes.txt").read_text() == "mine"
    code, _, err = run_cli([task, "demo-data", str(root / "notes.txt")], capsys)
    assert code == 2 and "which is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing written beside it either


def _parsers() -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    """Every command's parser and every task action's."""
    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"biformer {name}")
        importlib.import_module(module).add_arguments(parser)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield name, parser
        for sub in subs:
            for action, subparser in sub.choices.items():
                yield f"{name} {action}", subparser


def _options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {flag: a for a in parser._actions if a.help != argparse.SUPPRESS for flag in a.option_strings}


def test_the_same_things_have_the_same_option_names() -> None:
    """--output for what a command writes, --num-workers for data workers, --json a switch that prints;
    a task's actions are train, eval, predict and demo-data."""
    seen = {}
    for command, parser in _parsers():
        options = _options(parser)
        seen[command] = options
        assert not {"--workers", "--out", "--outdir", "--output-dir", "--save-dir", "--save"} & set(options), command
        if "--json" in options:
            assert isinstance(options["--json"], argparse._StoreTrueAction), command
    for task in ("classify", "detect", "segment"):
        assert [c.split()[1] for c in seen if c.startswith(task + " ")] == ["train", "eval", "predict", "demo-data"]
        assert {"--num-train", "--num-val"} <= set(seen[f"{task} demo-data"])
        assert "--output" in seen[f"{task} train"] and "--num-workers" in seen[f"{task} train"]
        assert "--checkpoint" in seen[f"{task} eval"] and "--json" in seen[f"{task} eval"]
    assert "--output" in seen["push-to-hub"] and "--output" in seen["bench"]
