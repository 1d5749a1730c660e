"""What a run leaves behind besides checkpoints: ``metrics.csv`` (one row per epoch),
``steps.csv`` (the loss every ``log_interval`` updates), TensorBoard events in ``tb/`` and, at the
end, ``curves.png``. Only the main process writes."""
from __future__ import annotations

import csv
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..checkpoint import atomic_write
from .._extras import require

STEP_FIELDS = ("update", "epoch", "step", "loss", "lr", "img_per_s")


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def _csv_text(rows: Sequence[Dict[str, Any]], fieldnames: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in fieldnames})
    return buffer.getvalue()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def read_csv(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunLog:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_update: int = 0) -> None:
        self.out = out
        self.enabled = enabled
        self.writer: Any = None
        if not enabled:
            return
        self.steps_path = out / "steps.csv"
        # a resumed run drops rows logged after its checkpoint; they will be logged again
        rows = [r for r in read_csv(self.steps_path) if _int(r.get("update")) is not None
                and _int(r["update"]) <= resume_update]  # type: ignore[operator]
        _write_text(self.steps_path, _csv_text(rows, STEP_FIELDS))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: tensorboard is not installed (pip install \"biformer[train]\"); skipping TensorBoard logs", file=sys.stderr)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.writer = SummaryWriter(str(out / "tb"), purge_step=resume_update or None)

    def step(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.steps_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=list(STEP_FIELDS), extrasaction="ignore").writerow(
                {k: _fmt(row.get(k)) for k in STEP_FIELDS})
        if self.writer is not None:
            for key in ("loss", "lr", "img_per_s"):
                self.writer.add_scalar(f"train/{key}", row[key], row["update"])

    def epoch(self, history: List[Dict[str, Any]]) -> None:
        if not self.enabled or not history:
            return
        fieldnames = list(dict.fromkeys(k for row in history for k in row))
        _write_text(self.out / "metrics.csv", _csv_text(history, fieldnames))
        if self.writer is not None:
            last = history[-1]
            for key, value in last.items():
                if key not in ("epoch", "update") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, last["update"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def plot_curves(history: List[Dict[str, Any]], path: Path, metrics: Optional[Sequence[str]] = None) -> None:
    """Losses and ``metrics`` per epoch, as a PNG (default: classification's accuracies)."""
    require("matplotlib", extra="train")  # one clear error when the extra is absent
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if metrics is None:
        metrics = [k for k in ("val_top1", "ema_val_top1", "val_top5") if any(k in row for row in history)]
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        if any(key in row for row in history):
            ax_loss.plot(epochs, [row.get(key) for row in history], label=label)
    for key in metrics:
        ax_metric.plot(epochs, [row.get(key) for row in history], label=key.replace("_", " "))
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_metric.set(xlabel="epoch", title="validation")
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def show_progress(progress: bool, is_main: bool = True) -> bool:
    """Progress bars only on the main process and on a terminal: redirected to a file, a bar's
    carriage-return updates would flood the log; the one line per epoch is the record there."""
    return progress and is_main and sys.stderr.isatty()
