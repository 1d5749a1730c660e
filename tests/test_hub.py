"""The Hugging Face Hub: timm's layout, the offline hf-hub: round trip, and the upload over HTTP."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

import biformer
import biformer.hub
from biformer.checkpoint import save_model
from biformer.cli import main as cli_main
from biformer.errors import UserError

KWARGS: Dict[str, Any] = dict(num_classes=3, depths=(1, 1, 1, 1), embed_dims=(32, 64, 128, 256), n_win=2,
                              topks=(1, 2, 2, None))
CLASSES = ["cat", "dog", "fox"]
REPO = "someone/biformer-test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("biformer_tiny", **KWARGS).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a lost buffer would show in the outputs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A training run folder as `biformer train` leaves it (weights, config, metrics, curves)."""
    run = tmp_path / "run"
    run.mkdir()
    save_model(run / "best.safetensors", _model(), "biformer_tiny", KWARGS,
               {"class_names": json.dumps(CLASSES), "epoch": "7", "val_top1": "88.5000", "weights": "model"})
    (run / "config.yaml").write_text("preset: digits\ndataset: digits\nimg_size: 32\nepochs: 7\nlr: 0.001\n")
    rows = ["epoch,train_loss,val_loss,val_top1,best_top1"] + [f"{e},{1 / e:.3f},{1.5 / e:.3f},{80 + e},{80 + e}"
                                                              for e in range(1, 8)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(run / "curves.png")
    return run


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))


def test_save_pretrained_writes_timm_layout(tmp_path: Path) -> None:
    model = _model()
    out = biformer.save_pretrained(model, tmp_path / "hf", class_names=CLASSES)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "biformer_tiny"
    assert config["num_classes"] == 3 and config["label_names"] == CLASSES
    assert config["model_args"]["depths"] == [1, 1, 1, 1] and config["model_args"]["topks"] == [1, 2, 2, None]
    assert config["pretrained_cfg"]["mean"] == list(model.pretrained_cfg["mean"])
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert "No training run was given" in (out / "README.md").read_text()
    # an existing folder is never overwritten unless asked, and is replaced whole when it is
    (out / "mine.txt").write_text("user data")
    with pytest.raises(UserError, match="exists and is not empty"):
        biformer.save_pretrained(model, out)
    assert (out / "mine.txt").read_text() == "user data"
    biformer.save_pretrained(model, out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no staging folders left behind


def test_model_card_from_run(tmp_path: Path, run_dir: Path) -> None:
    out = biformer.hub.save_run_pretrained(run_dir, tmp_path / "hf", repo_id=REPO)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in card and "`import biformer` first" in card
    assert "epoch 7, val_top1 88.5000" in card  # the weights' own record
    assert "- dataset: `digits`" in card and "lr: 0.001" in card  # data and recipe from config.yaml
    assert "| 7 | 0.143 | 0.214 | 87 | 87 |" in card  # the last epoch's metrics row
    assert "Last 5 of 7 epochs" in card
    assert "![curves](curves.png)" in card and (out / "curves.png").is_file()


def _install_in_hf_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded repo at ``main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with HF_HUB_OFFLINE=1 (set in the environment and in huggingface_hub's
    constants, which it reads at import)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hf_hub_round_trip_offline(tmp_path: Path, run_dir: Path, offline_hub: Path) -> None:
    saved, _ = biformer.checkpoint.load_model(run_dir / "best.safetensors")
    folder = biformer.hub.save_run_pretrained(run_dir, tmp_path / "hf", repo_id=REPO)
    _install_in_hf_cache(folder, offline_hub, REPO)

    # timm's own hf-hub: path: config.json -> architecture and kwargs, then model.safetensors
    loaded = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    assert type(loaded).__name__ == "BiFormer" and loaded.num_classes == 3
    assert loaded.pretrained_cfg["label_names"] == CLASSES
    assert loaded.pretrained_cfg["hf_hub_id"] == REPO
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), saved.eval()(x))
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_predict_loads_hf_hub(tmp_path: Path, run_dir: Path, offline_hub: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = biformer.hub.save_run_pretrained(run_dir, tmp_path / "hf", repo_id=REPO)
    _install_in_hf_cache(folder, offline_hub, REPO)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)

    def predict(checkpoint: str) -> List[Dict[str, Any]]:
        assert cli_main(["predict", str(image), "--checkpoint", checkpoint, "--json", "--top-k", "3"]) == 0
        return json.loads(capsys.readouterr().out)["results"]

    from_hub = predict(f"hf-hub:{REPO}")
    assert from_hub == predict(str(run_dir / "best.safetensors"))
    assert {p["label"] for p in from_hub[0]["predictions"]} == set(CLASSES)

    # a repo that is not cached fails in one line naming it (offline: nothing is fetched)
    assert cli_main(["predict", str(image), "--checkpoint", "hf-hub:someone/missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("biformer predict: error: cannot get model.safetensors of 'hf-hub:someone/missing'")
    assert "\n" not in err


class _FakeHub(BaseHTTPRequestHandler):
    """The few Hub endpoints an upload uses; records every request."""

    requests: List[Tuple[str, str, bytes]] = []
    refuse = False  # answer every request 401, as the Hub does for a missing or wrong token

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def _reply(self, body: Dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append(("POST", self.path, body))
        if self.refuse:
            return self.send_error(401, "Invalid credentials in Authorization header")
        if self.path == "/api/repos/create":
            request = json.loads(body)
            return self._reply({"url": f"http://{self.headers['Host']}/{request['organization']}/{request['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's front matter
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            return self._reply({"commitUrl": f"http://127.0.0.1/{REPO}/commit/{COMMIT}", "commitOid": COMMIT})
        self.send_error(404)

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path, b""))
        self.send_error(404)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[Tuple[str, str, bytes]]]:
    import huggingface_hub.constants as constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    _FakeHub.requests = []
    _FakeHub.refuse = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    try:
        yield _FakeHub.requests
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_push_to_hub_uploads_the_layout(tmp_path: Path, run_dir: Path, fake_hub: List[Tuple[str, str, bytes]],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["push-to-hub", str(run_dir), REPO, "--private"]) == 0
    assert f"{REPO}/commit/{COMMIT}" in capsys.readouterr().out
    create = [json.loads(body) for method, path, body in fake_hub if path == "/api/repos/create"]
    assert create == [{"name": "biformer-test", "organization": "someone", "visibility": "private"}]
    commits = [body for method, path, body in fake_hub if path == f"/api/models/{REPO}/commit/main"]
    assert len(commits) == 1
    lines = [json.loads(line) for line in commits[0].decode().splitlines()]
    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
    assert sorted(files) == ["README.md", "config.json", "curves.png", "model.safetensors"]
    # the uploaded bytes are what save_pretrained writes locally
    local = biformer.hub.save_run_pretrained(run_dir, tmp_path / "local", repo_id=REPO)
    for name in ("README.md", "config.json"):
        assert files[name] == (local / name).read_bytes(), name
    uploaded = tmp_path / "uploaded.safetensors"
    uploaded.write_bytes(files["model.safetensors"])
    expected = load_file(str(local / "model.safetensors"))
    got = load_file(str(uploaded))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(path.startswith("/api/") for _, path, _ in fake_hub)  # nothing went anywhere else


def test_push_to_hub_refused_says_so_in_one_line(run_dir: Path, fake_hub: List[Tuple[str, str, bytes]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _FakeHub.refuse = True
    assert cli_main(["push-to-hub", str(run_dir), REPO]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"biformer push-to-hub: error: upload to '{REPO}' failed:") and "\n" not in err, err
    assert "401" in err
    assert not any("/commit/" in path for _, path, _ in fake_hub)  # nothing was committed


@pytest.mark.parametrize("flag", ["--output", "--save-dir"])  # --output as every command; --save-dir its old name
def test_push_to_hub_output_only_writes_the_folder(tmp_path: Path, run_dir: Path,
                                                   fake_hub: List[Tuple[str, str, bytes]],
                                                   capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert cli_main(["push-to-hub", str(run_dir), REPO, flag, str(tmp_path / "hf")]) == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "curves.png",
                                                                 "model.safetensors"]
    assert fake_hub == []  # no network
