"""FLOPs of one Bi-Level Routing Attention layer as a function of the region count per side ``S``.

The paper's model (Sec. 3.3 of Zhu et al., CVPR 2023), for an ``H x W`` map with ``C`` channels
(``qk_dim = dim = C``), ``S x S`` regions and ``k`` routed regions; one multiply-add = one FLOP:

* projections: ``3HWC^2`` (q, k, v) ``+ HWC^2`` (output);
* region routing: ``2 S^4 C`` (the region-to-region affinity; fvcore counts this matmul as
  ``S^4 C`` and the region means not at all, so a traced layer has ``S^4 C`` less than this model);
* token attention: ``2 k (HW)^2 C / S^2`` (each token against the ``k HW / S^2`` routed tokens,
  once for ``q k^T`` and once for ``attn v``);
* LCE: ``K^2 HWC`` for the depthwise ``K x K`` conv on v (not in the paper's formula).

Routing grows with ``S`` and attention shrinks, so their sum is smallest at ``S^6 = k (HW)^2 / 2``.
When ``S`` does not divide the map, regions are ``ceil(H/S) x ceil(W/S)`` tokens and the padded
tokens are computed too (that is what the routed kernel does), so the attention term uses the
padded region size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

from ..errors import UserValueError
from .._extras import require

__all__ = [
    "LayerFlops",
    "bra_flops",
    "full_attention_flops",
    "window_attention_flops",
    "optimal_regions_per_side",
    "dividing_region_counts",
    "ComplexityReport",
    "complexity_report",
    "WHY_SEVEN",
    "plot_curve",
    "time_region_counts",
]

WHY_SEVEN = (
    "Why the released models use S = 7 rather than the FLOP-optimal S: (1) one S serves every routed "
    "stage, and at 224x224 input those maps are 56x56, 28x28 and 14x14; the original code needs the "
    "region count to divide the map, which leaves S in {1, 2, 7, 14}, and S = 14 would make stage-3 "
    "regions a single token. (2) The optimum assumes FLOPs are what costs time, but each region is a "
    "separate small attention problem: with tiny regions (a few tokens) the gathers, the routing and "
    "the per-region kernel overhead dominate, and the measured time stops falling long before the "
    "FLOPs do (see `biformer complexity ... --time` and docs/choosing_S.md). (3) For the actual stage "
    "maps the optimum is small anyway: about 13, 10 and 8 for stages 1-3 of BiFormer-T at 224x224."
)


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one attention layer on one ``H x W x C`` map (batch of one), by part."""

    name: str
    projections: float
    routing: float
    attention: float
    lce: float
    S: Optional[int] = None  # regions per side, for BRA

    @property
    def total(self) -> float:
        return self.projections + self.routing + self.attention + self.lce

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "total": self.total}


def _check(height: int, width: int, channels: int) -> None:
    if height < 1 or width < 1 or channels < 1:
        raise UserValueError(f"got size {height}x{width} and channels={channels}; expected positive values")


def _projections(tokens: int, channels: int) -> float:
    return 4.0 * tokens * channels ** 2  # q, k, v and the output projection


def bra_flops(
    height: int, width: int, channels: int, topk: int, regions_per_side: int, lce_kernel: int = 5
) -> LayerFlops:
    """The paper's FLOP model of one BRA layer with ``regions_per_side`` (``S``) regions per side."""
    _check(height, width, channels)
    s = regions_per_side
    if s < 1 or s > min(height, width):
        raise UserValueError(
            f"got S={s} regions per side for a {height}x{width} map; expected 1 <= S <= {min(height, width)}"
        )
    if not 1 <= topk <= s * s:
        raise UserValueError(f"got topk={topk} but S={s} gives only {s * s} regions; expected 1 <= topk <= {s * s}")
    region_tokens = math.ceil(height / s) * math.ceil(width / s)
    padded_tokens = s * s * region_tokens
    tokens = height * width
    return LayerFlops(
        name=f"BRA S={s}",
        projections=_projections(tokens, channels),
        routing=2.0 * s ** 4 * channels,
        attention=2.0 * topk * padded_tokens * region_tokens * channels,
        lce=float(lce_kernel ** 2 * tokens * channels),
        S=s,
    )


def full_attention_flops(height: int, width: int, channels: int) -> LayerFlops:
    """Plain global self-attention: every token against every token."""
    _check(height, width, channels)
    tokens = height * width
    return LayerFlops("full attention", _projections(tokens, channels), 0.0, 2.0 * tokens ** 2 * channels, 0.0)


def window_attention_flops(height: int, width: int, channels: int, window: int = 7) -> LayerFlops:
    """Swin-style local attention in non-overlapping ``window x window`` windows (map padded to fit)."""
    _check(height, width, channels)
    padded = math.ceil(height / window) * window * math.ceil(width / window) * window
    attention = 2.0 * padded * window ** 2 * channels
    return LayerFlops(f"window attention {window}x{window}", _projections(height * width, channels), 0.0, attention, 0.0)


def optimal_regions_per_side(height: int, width: int, topk: int) -> float:
    """The paper's optimum of routing + attention: ``S = (k (HW)^2 / 2) ** (1/6)``."""
    return (topk * (height * width) ** 2 / 2.0) ** (1.0 / 6.0)


def dividing_region_counts(height: int, width: int, topk: int = 1) -> List[int]:
    """``S`` values that cut the map into equal regions with no padding and have at least ``topk`` regions."""
    return [s for s in range(1, min(height, width) + 1) if height % s == 0 and width % s == 0 and s * s >= topk]


@dataclass
class ComplexityReport:
    height: int
    width: int
    channels: int
    topk: int
    models_S: int
    optimal_S: float
    best_dividing_S: Optional[int]
    curve: List[LayerFlops]  # BRA for S = 1 .. max_S
    at_models_S: LayerFlops
    at_optimal_S: LayerFlops  # at the integer S nearest the optimum
    full_attention: LayerFlops
    window_attention: LayerFlops

    def to_dict(self) -> Dict[str, Any]:
        return {
            "size": [self.height, self.width],
            "channels": self.channels,
            "topk": self.topk,
            "optimal_S": self.optimal_S,
            "models_S": self.models_S,
            "best_dividing_S": self.best_dividing_S,
            "breakdown_at_models_S": self.at_models_S.to_dict(),
            "breakdown_at_optimal_S": self.at_optimal_S.to_dict(),
            "full_attention": self.full_attention.to_dict(),
            "window_attention": self.window_attention.to_dict(),
            "curve": [{"S": f.S, "total": f.total, "routing": f.routing,
                       "attention": f.attention} for f in self.curve],
        }


def complexity_report(
    height: int,
    width: int,
    channels: int,
    topk: int,
    models_S: int = 7,
    window: int = 7,
    lce_kernel: int = 5,
    max_S: Optional[int] = None,
) -> ComplexityReport:
    """Everything ``biformer complexity`` prints: the curve over ``S``, the optimum, the baselines."""
    _check(height, width, channels)
    smallest = math.ceil(math.sqrt(topk))  # fewer regions than topk is not a valid layer
    optimum = optimal_regions_per_side(height, width, topk)
    max_S = min(max_S or max(3 * math.ceil(optimum), 2 * models_S), min(height, width))
    if smallest > max_S:
        raise UserValueError(
            f"got topk={topk}, which needs at least {smallest} regions per side, but a {height}x{width} map "
            f"allows at most {min(height, width)}"
        )
    curve = [bra_flops(height, width, channels, topk, s, lce_kernel) for s in range(smallest, max_S + 1)]
    dividing = [s for s in dividing_region_counts(height, width, topk) if s <= max_S]
    best = min(dividing, key=lambda s: curve[s - smallest].total) if dividing else None
    nearest = min(max(round(optimum), smallest), max_S)
    return ComplexityReport(
        height=height, width=width, channels=channels, topk=topk, models_S=models_S, optimal_S=optimum,
        best_dividing_S=best, curve=curve,
        at_models_S=bra_flops(height, width, channels, topk, models_S, lce_kernel),
        at_optimal_S=curve[nearest - smallest],
        full_attention=full_attention_flops(height, width, channels),
        window_attention=window_attention_flops(height, width, channels, window),
    )


def plot_curve(report: ComplexityReport, path: str, timings: Optional[Sequence[Dict[str, float]]] = None) -> None:
    """A PNG of FLOPs against ``S``: the paper's smooth model and its parts, the cost with padding
    where ``S`` does not divide the map, the optimum, the models' ``S`` and both baselines."""
    import numpy as np
    require("matplotlib", extra="analysis")  # one clear error when the extra is absent
    from matplotlib.figure import Figure

    g = 1e9
    h, w, c, k = report.height, report.width, report.channels, report.topk
    first = report.curve[0]
    constant = (first.projections + first.lce) / g
    s_smooth = np.linspace(first.S, report.curve[-1].S, 400)
    routing = 2.0 * s_smooth ** 4 * c / g
    attention = 2.0 * k * (h * w) ** 2 * c / s_smooth ** 2 / g

    fig = Figure(figsize=(10, 5.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(s_smooth, constant + routing + attention, "-", color="black", lw=2, label="BRA total (paper's model)")
    ax.plot(s_smooth, attention, "--", color="tab:blue", label="token attention 2k(HW)²C/S²")
    ax.plot(s_smooth, routing, "--", color="tab:orange", label="region routing 2S⁴C")
    ax.axhline(constant, color="tab:gray", ls=":", label="projections 4HWC² + LCE")
    ax.plot([f.S for f in report.curve], [f.total / g for f in report.curve], "-", color="0.6", lw=0.8,
            label="BRA total with padding\n(S not dividing the map)")
    dividing = [f for f in report.curve if h % f.S == 0 and w % f.S == 0]
    ax.plot([f.S for f in dividing], [f.total / g for f in dividing], "o", color="black", ms=4,
            label="S dividing the map")
    ax.axhline(report.window_attention.total / g, color="tab:green", ls="-.", label=report.window_attention.name)
    ax.axhline(report.full_attention.total / g, color="tab:red", ls="-.", label="full attention")
    opt = report.optimal_S
    opt_total = constant + (2.0 * opt ** 4 * c + 2.0 * k * (h * w) ** 2 * c / opt ** 2) / g
    ax.axvline(opt, color="tab:purple", lw=1)
    ax.annotate(f"optimum S = {opt:.1f}\n(S⁶ = k(HW)²/2)", (opt, opt_total), textcoords="offset points",
                xytext=(6, 30), color="tab:purple")
    ax.plot([report.models_S], [report.at_models_S.total / g], "*", color="tab:red", ms=14,
            label=f"models' S = {report.models_S}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(constant, report.window_attention.total / g) / 20)
    ax.set_xlabel("regions per side S")
    ax.set_ylabel("GFLOPs (1 multiply-add = 1 FLOP)")
    ax.set_title(f"One BRA layer on a {h}x{w} map, C = {c}, k = {k}")
    ax.grid(True, which="both", alpha=0.3)
    if timings:
        ax2 = ax.twinx()
        rows = [t for t in timings if t["S"] > 0]
        ax2.plot([t["S"] for t in rows], [t["ratio"] for t in rows], "s-", color="tab:cyan",
                 label="measured time / window attention")
        ax2.set_ylabel("measured time relative to window attention", color="tab:cyan")
        ax2.set_yscale("log")
        ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.12, 0.2))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.12 if timings else 1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path)


def _interleaved_median_seconds(fns: Sequence[Any], repeats: int) -> List[float]:
    """Median time of each function, timed in interleaved rounds so that load changes on a shared
    machine hit every candidate alike."""
    import time

    for fn in fns:
        fn()  # warm-up: allocator, kernel selection
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def time_region_counts(
    height: int,
    width: int,
    channels: int,
    topk: int,
    s_values: Sequence[int],
    num_heads: Optional[int] = None,
    window: int = 7,
    repeats: int = 15,
    max_flops: float = 2e10,
    threads: Optional[int] = 1,
) -> List[Dict[str, float]]:
    """Forward time of :func:`biformer.ops.bi_level_routing_attention` (``backend="sdpa"``, routing,
    gathers and attention; no projections) at each ``S``, against window attention (SDPA in
    ``window x window`` windows) timed in the same run. Values of ``S`` whose routing + attention
    exceed ``max_flops`` are skipped. ``num_heads`` defaults to head width 32, as in the models.
    ``threads`` (default 1) sets torch's intra-op threads for the measurement and is restored
    afterwards: on a shared machine, waiting for a second thread dominates small kernels.
    Each row: ``S``, ``ms``, ``ratio`` (to window attention),
    ``gflops`` (routing + attention of the model) and ``gflops_per_s``.
    """
    import torch
    import torch.nn.functional as F

    from ..ops import bi_level_routing_attention

    if num_heads is None:
        num_heads = channels // 32 if channels % 32 == 0 else 1
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, height, width, channels) for _ in range(3))
    d = channels // num_heads

    def windows(x: "torch.Tensor") -> "torch.Tensor":  # (1, H, W, C) -> (nW, heads, w*w, d)
        x = F.pad(x, (0, 0, 0, (-width) % window, 0, (-height) % window))
        hp, wp = x.shape[1] // window, x.shape[2] // window
        x = x.view(hp, window, wp, window, num_heads, d).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(hp * wp, num_heads, window * window, d)

    def routed_flops(s: int) -> float:
        f = bra_flops(height, width, channels, topk, s)
        return f.routing + f.attention

    kept = [s for s in s_values if routed_flops(s) <= max_flops]

    def bra(s: int) -> Any:
        return lambda: bi_level_routing_attention(q, k, v, num_heads=num_heads, topk=topk, n_win=s, backend="sdpa")

    window_flops = 2.0 * height * width * window ** 2 * channels
    saved_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            seconds = _interleaved_median_seconds(
                [lambda: F.scaled_dot_product_attention(windows(q), windows(k), windows(v))] + [bra(s) for s in kept],
                repeats,
            )
    finally:
        torch.set_num_threads(saved_threads)
    baseline = seconds[0]
    rows = [{"S": 0, "region_tokens": window * window, "ms": baseline * 1e3, "ratio": 1.0,
             "gflops": window_flops / 1e9, "gflops_per_s": window_flops / 1e9 / baseline}]
    for s, sec in zip(kept, seconds[1:]):
        rows.append({
            "S": s,
            "region_tokens": math.ceil(height / s) * math.ceil(width / s),
            "ms": sec * 1e3,
            "ratio": sec / baseline,
            "gflops": routed_flops(s) / 1e9,
            "gflops_per_s": routed_flops(s) / 1e9 / sec,
        })
    return rows
