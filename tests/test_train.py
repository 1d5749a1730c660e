"""biformer train / eval / predict: config precedence, sampling, bad data, resume, DDP equivalence."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from biformer.cli import main as cli_main
from biformer.classification import cli_train
from biformer.classification.config import PRESETS, build_config, resolved_drop_path, resolved_lr
from biformer.classification.data import TrainBatchSampler, digits_split, shard_indices
from biformer.engine import loop

REPO = Path(__file__).resolve().parents[1]

# A BiFormer small enough for a test: 32 px input, maps 8/4/2/1, 2x2 regions in routed stages.
TINY_MODEL = "{depths: [1, 1, 1, 1], embed_dims: [16, 32, 32, 32], head_dim: 16, n_win: 2, topks: [1, 2, 2, null]}"
CLASSES = ("cat", "dog", "fox")


def tiny_args(data: Path, out: Path, *extra: str) -> List[str]:
    """Flags for a few-second run on the tiny folder: plain loss, mild crops, no EMA."""
    return [
        "train", "--data", str(data), "--output", str(out), "--model-kwargs", TINY_MODEL,
        "--img-size", "32", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1", "--lr", "2e-3",
        "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aug-repeats", "0", "--no-model-ema",
        "--scale", "0.8", "1", "--num-workers", "0", "--log-interval", "1", "--no-progress", "--no-tensorboard",
        *extra,
    ]


def make_folder(root: Path, train_per_class: int = 4, val_per_class: int = 2, corrupt: bool = False) -> Path:
    """An ImageFolder of 12x12 images whose colour tells the class; optionally one truncated JPEG
    in train/ and one in val/."""
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.int16)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-40, 40, size=(12, 12, 3))
                pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)
    if corrupt:
        for split in ("train", "val"):
            good = (root / split / CLASSES[0] / "0.jpg").read_bytes()
            (root / split / CLASSES[0] / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated
    return root


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def same_threads_env(**extra: str) -> Dict[str, str]:
    """The environment for a subprocess that must compute exactly as this process: the same torch
    thread count (under xdist conftest.py sets 1; a fresh process would take every core), since
    float sums are split differently across threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **extra}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run this process's torch ops on ``n`` threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture) -> tuple:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- configuration -----------------------------------------------------------------------------


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_config_precedence_presets_and_recipe(tmp_path: Path) -> None:
    # no data -> digits preset; --data -> the paper's ImageNet recipe
    digits = cli_train.load_config(_parse([]))
    assert digits.preset == "digits" and digits.img_size == PRESETS["digits"]["img_size"] and not digits.model_ema
    paper = cli_train.load_config(_parse(["--data", str(tmp_path)]))
    assert paper.preset == "imagenet"
    assert (paper.epochs, paper.opt, paper.weight_decay, paper.warmup_epochs) == (300, "adamw", 0.05, 5)
    assert (paper.warmup_lr, paper.min_lr, paper.sched) == (1e-6, 1e-5, "cosine")
    assert (paper.aa, paper.mixup, paper.cutmix, paper.smoothing, paper.reprob) == (
        "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25)
    assert paper.aug_repeats == 3 and paper.model_ema and paper.clip_grad is None
    # lr 5e-4 x global batch / 512; drop path 0.1 / 0.15 / 0.4 for T / S / B
    assert resolved_lr(paper, world_size=8) == pytest.approx(5e-4 * 128 * 8 / 512)
    for model, rate in (("biformer_tiny", 0.1), ("biformer_small", 0.15), ("biformer_base", 0.4)):
        assert resolved_drop_path(build_config({"data": "x", "model": model})) == rate

    # preset < YAML file < command line
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("preset: digits\nepochs: 7\nbatch-size: 16\nscale: [0.5, 1.0]\nmodel_kwargs: {n_win: 4}\n")
    cfg = cli_train.load_config(_parse(["--config", str(yaml_path), "--epochs", "9", "--no-progress"]))
    assert (cfg.preset, cfg.epochs, cfg.batch_size, cfg.scale, cfg.model_kwargs) == (
        "digits", 9, 16, (0.5, 1.0), {"n_win": 4})
    assert cfg.img_size == PRESETS["digits"]["img_size"] and cfg.progress is False

    with pytest.raises(ValueError, match="unknown config option 'epoch'.*epochs"):
        build_config({}, _write(tmp_path / "bad.yaml", "epoch: 3\n"))
    with pytest.raises(ValueError, match="got batch_size='many'"):
        build_config({"batch_size": "many"})
    with pytest.raises(ValueError, match="even batch size"):
        build_config({"data": "x", "batch_size": 5})


def test_shipped_configs_state_the_presets() -> None:
    """configs/train/*.yaml load, and spell out the presets: digits.yaml is the default run,
    imagenet_biformer_{tiny,small,base}.yaml the paper's recipe with the model's drop path."""
    from biformer.classification.config import to_dict

    files = {p.stem: str(p) for p in (REPO / "configs" / "train").glob("*.yaml")}
    assert {"digits", "imagenet_biformer_tiny", "imagenet_biformer_small", "imagenet_biformer_base"} <= set(files)
    digits = to_dict(build_config({}, files["digits"]))
    assert digits == {**to_dict(build_config({})), "dataset": "digits"}
    for size, rate in (("tiny", 0.1), ("small", 0.15), ("base", 0.4)):
        cfg = to_dict(build_config({"data": "x"}, files[f"imagenet_biformer_{size}"]))
        paper = to_dict(build_config({"data": "x", "model": f"biformer_{size}", "drop_path": rate}))
        assert cfg == paper, size


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_digits_split_is_deterministic_and_stratified() -> None:
    train_x, train_y = digits_split("train")
    val_x, val_y = digits_split("val")
    assert (len(train_y), len(val_y)) == (1437, 360)
    assert train_x.shape[1:] == (8, 8) and train_x.dtype == np.uint8 and train_x.max() == 255
    again_x, again_y = digits_split("val")
    assert np.array_equal(again_x, val_x) and np.array_equal(again_y, val_y)
    val_share = np.bincount(val_y, minlength=10) / np.bincount(np.concatenate([train_y, val_y]), minlength=10)
    assert np.all(np.abs(val_share - 0.2) < 0.02)  # every class split 80/20


# ---- sampling ----------------------------------------------------------------------------------


def test_sampler_splits_global_batches_independently_of_processes() -> None:
    def micro_batches(world: int, accum: int, repeats: int = 0) -> Dict[int, List[list]]:
        out: Dict[int, List[list]] = {}
        for rank in range(world):
            sampler = TrainBatchSampler(50, 4, world_size=world, rank=rank, accum_steps=accum, repeats=repeats, seed=3)
            sampler.set_epoch(2)
            out[rank] = list(sampler)
        return out

    one = micro_batches(1, 2)[0]  # one process, 2 accumulation steps: micro-batches m0, m1, m0, m1...
    two = micro_batches(2, 1)  # two processes: rank r's k-th batch is update k's slot r
    assert len(one) == 2 * len(two[0]) == 2 * 6  # 50 // 8 updates, tail dropped
    assert one[0::2] == two[0] and one[1::2] == two[1]  # same images and augmentation seeds per slot
    indices = [i for batch in one for i, _ in batch]
    assert len(set(indices)) == len(indices) == 48
    # another epoch is another order; resuming at a step yields the rest of the same order
    sampler = TrainBatchSampler(50, 4, accum_steps=2, seed=3)
    sampler.set_epoch(2, start_step=4)
    assert list(sampler) == one[8:] and len(sampler) == 4
    sampler.set_epoch(3)
    assert list(sampler) != one
    # repeated augmentation: copies of an image get different seeds and land in different slots
    rep = [item for batch in micro_batches(2, 1, repeats=3)[0] for item in batch]
    assert len({seed for _, seed in rep}) == len(rep)
    # eval shards cover every image exactly once, with no padding
    shards = [shard_indices(7, 2, r) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        TrainBatchSampler(10, 32, world_size=2)


# ---- train, eval, predict on a folder with bad files -------------------------------------------


def test_folder_train_eval_predict_with_corrupt_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_folder(tmp_path / "data", corrupt=True)  # train: 12 good + 1 truncated, val: 6 + 1
    out = tmp_path / "run"
    code, _, err = run_cli(tiny_args(data, out, "--batch-size", "13", "--epochs", "2"), capsys)
    assert code == 0, err
    assert "skipped unreadable image" in err and "broken.jpg" in err

    for name in ("best.safetensors", "last.safetensors", "state.pt", "config.yaml", "metrics.csv",
                 "steps.csv", "curves.png"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(int(r["train_skipped"]) >= 1 for r in rows)  # the broken image is in every epoch's batch
    assert all(int(r["val_skipped"]) == 1 and int(r["val_images"]) == 6 for r in rows)
    state = torch.load(out / "state.pt", weights_only=True)  # plain types only
    assert state["epoch"] == 2 and state["step"] == 0 and len(state["history"]) == 2

    # eval reproduces the best epoch's figure; the broken val image is counted, not evaluated
    code, stdout, err = run_cli(["eval", "--checkpoint", str(out / "best.safetensors"), "--data", str(data),
                                 "--num-workers", "0", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    best = max(rows, key=lambda r: float(r["val_top1"]))
    assert report["num_images"] == 6 and report["num_skipped"] == 1
    assert report["top1"] == pytest.approx(float(best["val_top1"]), abs=1e-3)
    assert report["loss"] == pytest.approx(float(best["val_loss"]), rel=1e-4)
    assert set(report["per_class"]) == set(CLASSES)

    # predict names the classes and reports the unreadable file
    code, stdout, err = run_cli(["predict", str(data / "val"), "--checkpoint", str(out / "best.safetensors"),
                                 "--top-k", "2", "--json"], capsys)
    assert code == 0, err
    pred = json.loads(stdout)
    assert len(pred["results"]) == 6 and [Path(s["path"]).name for s in pred["skipped"]] == ["broken.jpg"]
    first = pred["results"][0]["predictions"]
    assert len(first) == 2 and {p["label"] for p in first} <= set(CLASSES)
    assert first[0]["probability"] >= first[1]["probability"]

    # clear errors: a run directory in use, another model's checkpoint, missing or empty data
    code, _, err = run_cli(tiny_args(data, out), capsys)
    assert code == 2 and "already holds a run" in err
    code, _, err = run_cli(["eval", "--checkpoint", str(out / "best.safetensors"), "--data", str(data),
                            "--model", "biformer_small"], capsys)
    assert code == 2 and "biformer_tiny" in err and "biformer_small" in err
    code, _, err = run_cli(tiny_args(tmp_path / "nowhere", tmp_path / "r2"), capsys)
    assert code == 2 and "no dataset directory" in err
    (tmp_path / "empty" / "train" / "no_images").mkdir(parents=True)
    code, _, err = run_cli(tiny_args(tmp_path / "empty", tmp_path / "r3"), capsys)
    assert code == 2 and "no class folders with images" in err
    code, _, err = run_cli(["train", "--resume", str(out), "--epochs", "5"], capsys)
    assert code == 2 and "cannot change --epochs when resuming" in err


# ---- resume --------------------------------------------------------------------------------------

KILL_AFTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    from biformer.engine import loop
    from biformer.cli import main

    kill_at = int(sys.argv[1])
    original = loop.Engine.save_state
    saves = []

    def save_then_die(self):
        original(self)
        saves.append(self.update_index)
        if len(saves) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a crash or a pre-empted job

    loop.Engine.save_state = save_then_die
    sys.exit(main(sys.argv[2:]))
""")


RESUME_RECIPE = ["--epochs", "4", "--model-ema", "--model-ema-decay", "0.9", "--mixup", "0.8", "--smoothing", "0.1",
                 "--drop-path", "0.1", "--save-every", "2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """4 epochs without interruption, with EMA, mixup, random crops and drop path on, so every
    random draw has to come back the same after a resume."""
    root = tmp_path_factory.mktemp("resume")
    data = make_folder(root / "data")  # 12 train images: 3 updates of 4 per epoch
    assert cli_main(tiny_args(data, root / "straight", *RESUME_RECIPE)) == 0
    return data, root / "straight"


# Checkpoints fall at updates 2 (mid-epoch), 3 (epoch end), 4 (mid), 6 (end), 8 (mid), ...
@pytest.mark.parametrize("kill_at_save, position", [(4, (2, 0)), (5, (2, 2))], ids=["after-epoch-2", "mid-epoch-3"])
def test_resume_after_kill_gives_the_same_weights(
        straight_run: tuple, kill_at_save: int, position: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """N epochs straight == N/2 epochs + SIGKILL + --resume (and the same with a kill mid-epoch)."""
    data, straight = straight_run
    killed = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_SAVE)
    argv = tiny_args(data, killed, *RESUME_RECIPE, "--num-workers", "1")  # data workers on this time
    proc = subprocess.run([sys.executable, str(script), str(kill_at_save), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=same_threads_env())
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = torch.load(killed / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == position  # 0-based epoch in progress, updates done in it
    # one loop for every task: the shared engine wrote it, with the EMA and timm's scheduler in it
    assert (state["format"], state["task"]) == (loop.STATE_FORMAT, "classification")
    assert state["ema"] is not None and state["scheduler"]["base_values"]
    assert not (killed / "curves.png").exists()
    code, _, err = run_cli(["train", "--resume", str(killed), "--num-workers", "0"], capsys)
    assert code == 0, err
    assert "resumed" in err

    expected, got = load_file(straight / "last.safetensors"), load_file(killed / "last.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    ema_a = torch.load(straight / "state.pt", weights_only=True)["ema"]
    ema_b = torch.load(killed / "state.pt", weights_only=True)["ema"]
    for key in ema_a:
        torch.testing.assert_close(ema_b[key], ema_a[key], rtol=0, atol=1e-6, msg=key)
    rows_a, rows_b = read_rows(straight / "metrics.csv"), read_rows(killed / "metrics.csv")
    assert len(rows_a) == len(rows_b) == 4
    for a, b in zip(rows_a, rows_b):
        for key in ("train_loss", "val_loss", "val_top1", "ema_val_top1"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), (a["epoch"], key)
    steps_a, steps_b = read_rows(straight / "steps.csv"), read_rows(killed / "steps.csv")
    assert [r["update"] for r in steps_b] == [r["update"] for r in steps_a]
    # with --log-interval 1, an epoch's train_loss is the mean of its updates' logged losses, in
    # both runs (the straight run checkpoints mid-epoch too, the killed one restarts there)
    for rows, steps in ((rows_a, steps_a), (rows_b, steps_b)):
        for row in rows:
            losses = [float(r["loss"]) for r in steps if r["epoch"] == row["epoch"]]
            assert len(losses) == 3
            assert float(row["train_loss"]) == pytest.approx(np.mean(losses), rel=1e-5), row["epoch"]


# ---- torchrun / DDP ----------------------------------------------------------------------------


def test_two_processes_match_one_process_with_the_same_global_batch(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """torchrun with 2 CPU processes (gloo), batch 4 each == 1 process, batch 4 x 2 accumulation steps:
    same loss every update, same weights; the sharded validation (7 images, uneven shards) counts
    every image once and agrees with a 1-process eval of the same weights."""
    data = make_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    (tmp_path / "data" / "val" / CLASSES[1] / "extra.jpg").write_bytes(
        (tmp_path / "data" / "val" / CLASSES[1] / "0.jpg").read_bytes())  # 7 val images
    recipe = ["--epochs", "2", "--mixup", "0.8", "--drop-path", "0.1"]  # random draws must agree too
    one, two = tmp_path / "one", tmp_path / "two"
    # One thread in every process: AdamW's first steps magnify the last-bit differences that
    # another thread count gives (up to ~1e-4 in small biases), which would hide real mismatches.
    with torch_threads(1):
        code, _, err = run_cli(tiny_args(data, one, *recipe, "--batch-size", "2", "--accum-steps", "2"), capsys)
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "biformer", *tiny_args(data, two, *recipe, "--batch-size", "2")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    loss_one = [float(r["loss"]) for r in read_rows(one / "steps.csv")]
    loss_two = [float(r["loss"]) for r in read_rows(two / "steps.csv")]
    assert len(loss_one) == len(loss_two) == 6  # 12 images / global batch 4, 2 epochs
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4)
    assert loss_one[0] != loss_one[1]
    w_one, w_two = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    for key in w_one:
        if "running" not in key and "num_batches" not in key:  # BN statistics: averaged over ranks instead
            torch.testing.assert_close(w_two[key], w_one[key], rtol=1e-4, atol=1e-5, msg=key)

    final = read_rows(two / "metrics.csv")[-1]
    eval_argv = ["eval", "--checkpoint", str(two / "last.safetensors"), "--data", str(data), "--num-workers", "0",
                 "--batch-size", "3", "--json"]
    code, stdout, err = run_cli(eval_argv, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert int(final["val_images"]) == report["num_images"] == 7
    assert float(final["val_top1"]) == pytest.approx(report["top1"], abs=1e-3)
    assert float(final["val_loss"]) == pytest.approx(report["loss"], rel=1e-4)

    # `biformer eval` under torchrun: shards of 4 and 3 images, the same figures as one process
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "biformer", *eval_argv], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout)  # only rank 0 prints
    assert sharded["num_images"] == 7 and sharded["per_class"] == report["per_class"]
    assert sharded["top1"] == report["top1"] and sharded["top5"] == report["top5"]
    assert sharded["loss"] == pytest.approx(report["loss"], rel=1e-5)


def test_eval_and_predict_accept_an_original_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint in the original repository's format (``{"model": state_dict}``, 1000 classes,
    no metadata) evaluates on a folder and predicts ImageNet labels, with timm's default
    preprocessing for the model; asking for another model is refused, naming both."""
    from .conftest import original_state_dict

    data = make_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    ckpt = tmp_path / "biformer_tiny_original.pth"
    torch.save({"model": original_state_dict("tiny")}, ckpt)
    code, stdout, err = run_cli(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--num-workers", "0",
                                 "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["model"] == "biformer_tiny" and report["num_images"] == 3
    assert set(report["per_class"]) == set(CLASSES)  # the folder's classes name labels 0..2
    assert 0.0 <= report["top1"] <= report["top5"] <= 100.0 and report["loss"] > 0

    code, stdout, err = run_cli(["predict", str(data / "val" / CLASSES[0] / "0.jpg"), "--checkpoint", str(ckpt),
                                 "--top-k", "3", "--json"], capsys)
    assert code == 0, err
    preds = json.loads(stdout)["results"][0]["predictions"]
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo().label_descriptions()
    assert [p["label"] for p in preds] == [descriptions[p["index"]] for p in preds]
    assert sum(p["probability"] for p in preds) <= 1.0 + 1e-6

    code, _, err = run_cli(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--model", "biformer_small"],
                           capsys)
    assert code == 2 and "holds a biformer_tiny checkpoint" in err and "biformer_small" in err


# ---- the README's main job ---------------------------------------------------------------------


@pytest.mark.slow
def test_default_digits_run_reaches_97_percent(tmp_path: Path) -> None:
    """`biformer train --output DIR` (no data: the digits preset), then `biformer eval --json`."""
    out = tmp_path / "digits"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "biformer", "train", "--output", str(out), "--no-progress"],
                   cwd=tmp_path, check=True, timeout=1800, env=env)
    best = max(float(r["val_top1"]) for r in read_rows(out / "metrics.csv"))
    assert best >= 97.0
    proc = subprocess.run([sys.executable, "-m", "biformer", "eval", "--checkpoint", str(out / "best.safetensors"),
                           "--json"], cwd=tmp_path, check=True, capture_output=True, text=True, env=env)
    report = json.loads(proc.stdout)
    assert report["num_images"] == 360
    assert report["top1"] == pytest.approx(best, abs=1e-3)
