"""Command-line options of the shared training engine (:mod:`biformer.engine.loop`), kept in a module
without torch so that ``biformer detect train --help`` and ``biformer segment train --help`` answer at once."""
from __future__ import annotations

from typing import Any


def add_engine_arguments(parser: Any, *, epochs: int, batch_size: int, lr: float, warmup_steps: int,
                         log_every: int = 20) -> None:
    """The training options every dense task shares (classification has its own config system)."""
    parser.add_argument("--output", default=None, help="run folder: config.yaml, last/best.safetensors, state.pt, "
                        "metrics.csv, steps.csv, tb/, curves.png")
    parser.add_argument("--resume", metavar="RUN", default=None, help="continue the run in RUN where it stopped")
    parser.add_argument("--overwrite", action="store_true", help="start again in an --output that holds a run")
    parser.add_argument("--epochs", type=int, default=epochs, help="passes over the training images")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per process and micro-step")
    parser.add_argument("--accum-steps", type=int, default=1, help="micro-steps per update (gradient accumulation)")
    parser.add_argument("--lr", type=float, default=lr, help="AdamW peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (none on norms, biases)")
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps, help="linear warmup updates")
    parser.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    parser.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                        help="mixed precision (auto: bf16 or fp16 on GPUs, none on CPUs)")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPU processes")
    parser.add_argument("--save-every", type=int, default=0, help="also checkpoint every N updates (0: epoch ends)")
    parser.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    parser.add_argument("--log-every", type=int, default=log_every, help="updates between steps.csv rows")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader processes per training process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard logs")


__all__ = ["add_engine_arguments"]
