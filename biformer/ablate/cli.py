"""``biformer ablate``: train the skeleton with each token mixer, then tabulate accuracy against cost."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List

from ..errors import UserError

# the names of .mixers.MIXERS, here without importing it (it imports torch); a test checks they agree
MIXERS = ("bra", "window", "shifted_window", "axial", "dilated_global", "dilated_local", "full", "random", "static")

# --quick: every mixer once, small enough for 2 CPU cores in under 15 minutes (see docs/ablation.md)
QUICK: Dict[str, Any] = dict(topk=[2], seeds=1, epochs=2, img_size=32, n_win=2, bench_batch=32, bench_steps=3)
DEFAULTS: Dict[str, Any] = dict(topk=[1, 4, 8], seeds=3, epochs=20, img_size=64, n_win=4, bench_batch=64,
                                bench_steps=5)

EXAMPLES = """examples:
  biformer ablate --quick --output runs/ablate-quick            # every mixer once on the digits
  biformer ablate --mixers bra,window,random,static --topk 1,4,8 --seeds 3 --epochs 20 --output runs/abl
  biformer ablate ... --shard 0/2 &  biformer ablate ... --shard 1/2     # two processes split the runs
  torchrun --standalone --nproc_per_node 4 -m biformer ablate ... --output runs/abl   # one shard per rank
  biformer ablate ... --report                                   # only rewrite the table from finished runs

A rerun with the same --output skips finished runs and resumes an interrupted one from its checkpoint.
Mixers: """ + ", ".join(MIXERS) + """ (topk applies to bra, random and static).
Small-data results do not reproduce ImageNet claims; see docs/ablation.md.
"""


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--output", required=True, metavar="DIR", help="ablation directory (runs, table)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="dataset root as `biformer train --data` takes it (default: the bundled digits)")
    parser.add_argument("--dataset", metavar="SPEC", default=None, help="as `biformer train --dataset`")
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="`biformer train` options for every run (model, epochs, seed, img size are the ablation's)")
    parser.add_argument("--mixers", type=_names, default=list(MIXERS), metavar="A,B,...",
                        help=f"token mixers to compare [default: all: {','.join(MIXERS)}]")
    parser.add_argument("--topk", type=_ints, default=None, metavar="K,...",
                        help=f"routed regions per query region, for bra/random/static [default: "
                             f"{','.join(map(str, DEFAULTS['topk']))}; --quick: {QUICK['topk'][0]}]")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"seeds per variant [default: {DEFAULTS['seeds']}; --quick: {QUICK['seeds']}]")
    parser.add_argument("--epochs", type=int, default=None, metavar="N",
                        help=f"training epochs per run [default: {DEFAULTS['epochs']}; --quick: {QUICK['epochs']}]")
    parser.add_argument("--img-size", type=int, default=None, metavar="PX",
                        help=f"input size [default: {DEFAULTS['img_size']}; --quick: {QUICK['img_size']}]")
    parser.add_argument("--n-win", type=int, default=None, metavar="N",
                        help=f"regions (and windows) per side [default: {DEFAULTS['n_win']}; --quick: {QUICK['n_win']}]")
    parser.add_argument("--bench-batch", type=int, default=None, metavar="N",
                        help=f"batch of the throughput and step-time measurement [default: {DEFAULTS['bench_batch']}]")
    parser.add_argument("--bench-steps", type=int, default=None, metavar="N", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="the small preset: every mixer once, topk 2, 2 epochs at 32 px (under 15 min on 2 cores)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="train only runs I, I+N, I+2N, ... of the plan (default under torchrun: RANK/WORLD_SIZE)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads per process (default: torch's; on a shared machine 1 is often far faster)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [default: auto]")
    parser.add_argument("--report", action="store_true", help="train nothing; rewrite the table from finished runs")


def settings_from_args(args: argparse.Namespace) -> Any:
    from .runner import AblationSettings

    preset = QUICK if args.quick else DEFAULTS
    given = dict(topk=args.topk, seeds=args.seeds, epochs=args.epochs, img_size=args.img_size, n_win=args.n_win,
                 bench_batch=args.bench_batch, bench_steps=args.bench_steps)
    values = {k: (v if v is not None else preset[k]) for k, v in given.items()}
    for name in ("seeds", "epochs", "img_size", "n_win", "bench_batch", "bench_steps"):
        if values[name] < 1:
            raise UserError(f"got --{name.replace('_', '-')}={values[name]}, expected a positive integer")
    if args.config and not os.path.isfile(args.config):
        raise UserError(f"no config file at {args.config!r}")
    return AblationSettings(
        output=args.output, mixers=args.mixers, topks=values["topk"], seeds=values["seeds"],
        epochs=values["epochs"], img_size=values["img_size"], n_win=values["n_win"], data=args.data,
        dataset=args.dataset, config=args.config, device=args.device, bench_batch=values["bench_batch"],
        bench_steps=values["bench_steps"],
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from . import runner

    settings = settings_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.shard is not None:
        shard = runner.parse_shard(args.shard)
    else:
        shard = (int(os.environ.get("RANK", 0)), world)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"got --threads={args.threads}, expected a positive integer")
        torch.set_num_threads(args.threads)
    elif world > 1 and settings.device in ("auto", "cpu") and not torch.cuda.is_available():
        # processes on one machine share its cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if args.report:
        runs = runner.plan_runs(settings.mixers, settings.topks, settings.seeds)
        runner.prepare_output(settings)
        runner.write_table_until_stable(settings, runs, runner._stderr)
        return 0
    runner.run_ablation(settings, shard)
    return 0
