"""``biformer complexity --size H W --channels C --topk K [--json]``: FLOPs of one BRA layer against S."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any, Dict, List, Optional

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # .complexity imports torch: only when the command runs, so --help is instant
    from .complexity import ComplexityReport, LayerFlops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", nargs=2, type=int, required=True, metavar=("H", "W"), help="map height and width in tokens")
    parser.add_argument("--channels", type=int, required=True, help="channels C (q/k width = v width = C)")
    parser.add_argument("--topk", type=int, required=True, help="routed regions k")
    parser.add_argument("--n-win", type=int, default=7, help="the S the models use, for comparison (default: 7)")
    parser.add_argument("--window", type=int, default=7, help="window of the window-attention baseline (default: 7)")
    parser.add_argument("--output", default=None, help="also write a PNG plot of FLOPs against S here")
    parser.add_argument("--time", action="store_true",
                        help="also time bi_level_routing_attention at the S values that divide the map, "
                             "against window attention in the same run (CPU, one thread; seconds for small maps)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _row(f: LayerFlops, reference: Optional[LayerFlops] = None) -> str:
    g = 1e9
    ratio = f"{f.total / reference.total:8.2f}x" if reference else ""
    return (f"{f.name:<24} {f.projections / g:>8.3f} {f.routing / g:>9.4f} {f.attention / g:>10.3f} "
            f"{f.lce / g:>7.3f} {f.total / g:>9.3f} {ratio}")


def format_report(report: ComplexityReport, timings: Optional[List[Dict[str, float]]]) -> str:
    lines = [
        f"One BRA layer on a {report.height}x{report.width} map, C={report.channels}, k={report.topk} "
        "(GFLOPs, 1 multiply-add = 1 FLOP, batch 1)",
        f"{'':<24} {'proj':>8} {'routing':>9} {'attention':>10} {'LCE':>7} {'total':>9} {'vs models S':>9}",
    ]
    reference = report.at_models_S
    rows = [report.at_models_S, report.at_optimal_S]
    if report.best_dividing_S is not None:
        rows.append(report.curve[report.best_dividing_S - report.curve[0].S])
    seen = set()
    for f in rows:
        if f.S not in seen:
            seen.add(f.S)
            lines.append(_row(f, reference))
    lines += [_row(report.window_attention, reference), _row(report.full_attention, reference), ""]
    lines.append(f"optimal S (S^6 = k(HW)^2/2): {report.optimal_S:.1f}    models' S: {report.models_S}    "
                 f"best S dividing the map: {report.best_dividing_S}")
    if timings:
        lines += ["", "measured forward time, CPU, 1 thread, median of 15 (routing + gathers + attention, sdpa backend;",
                  f"baseline: {report.window_attention.name} in the same run; GFLOP/s of the paper's model):",
                  f"{'S':>6} {'tokens/region':>14} {'ms':>9} {'vs window':>10} {'GFLOP/s':>8}"]
        for t in timings:
            name = "window" if t["S"] == 0 else str(int(t["S"]))
            lines.append(f"{name:>6} {int(t['region_tokens']):>14} {t['ms']:>9.2f} {t['ratio']:>9.2f}x "
                         f"{t['gflops_per_s']:>8.2f}")
    from .complexity import WHY_SEVEN

    lines += [""] + textwrap.wrap(WHY_SEVEN, width=100)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    height, width = args.size
    from .complexity import complexity_report, plot_curve, time_region_counts

    report = complexity_report(height, width, args.channels, args.topk, models_S=args.n_win, window=args.window)
    timings = None
    if args.time:
        s_values = [s for s in range(report.curve[0].S, min(height, width) + 1) if height % s == 0 and width % s == 0]
        timings = time_region_counts(height, width, args.channels, args.topk, s_values, window=args.window)
    out: Dict[str, Any] = report.to_dict()
    if args.output:  # nothing is written unless asked
        plot_curve(report, args.output, timings)
        out["plot"] = args.output
    if timings is not None:
        out["timings"] = timings
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_report(report, timings))
        if args.output:
            print(f"\nplot written to {args.output}", file=sys.stderr)
    return 0
