"""BRA in 3D against full attention and 3D window attention: ``python -m biformer.bench.bra3d``.

One layer at ``C = 64`` on a 16x56x56 video clip and a 96^3 volume, forward + backward, batch 1:

* ``bra3d``: :class:`biformer.layers.BiLevelRoutingAttention3d` (its attention, projections and LCE);
* ``window3d``: the same projections and LCE, attention only within each query's own 3D region
  (the same regions as BRA, i.e. BRA with ``topk = 1`` and the region itself instead of the routed ones);
* ``full``: the same projections and LCE, SDPA over every token of the map. Run only when its estimated
  cost is under ``--full-max-gflop`` (default 2000); otherwise the row says why, with the estimate.

Prints one markdown row per candidate: median fwd+bwd seconds over ``--repeats`` calls (after
``--warmup`` untimed calls) and the peak tensor memory one call allocates (CPU: profiler
allocation events; CUDA: ``max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import BiLevelRoutingAttention3d
from ..ops.regions import RegionGrid, from_regions, to_regions
from .harness import available_memory_bytes, peak_memory_growth


@dataclass(frozen=True)
class Case:
    name: str
    size: Tuple[int, int, int]  # (D, H, W)
    region_size: Tuple[int, int, int]
    topk: int


CASES = {
    "video": Case("video 16x56x56", (16, 56, 56), (4, 8, 8), 4),  # 4x7x7 = 196 regions of 256 tokens
    "volume": Case("volume 96^3", (96, 96, 96), (8, 8, 8), 4),  # 12^3 = 1728 regions of 512 tokens
}
CHANNELS, HEADS = 64, 4


class _SameProjections(nn.Module):
    """BRA-3D's projections and LCE around another token mixer ``(q, k, v) -> out`` on NDHWC maps."""

    def __init__(self, bra: BiLevelRoutingAttention3d, mix: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.bra, self.mix = bra, mix

    def forward(self, x: Tensor) -> Tensor:
        b = self.bra
        x = x.permute(0, 2, 3, 4, 1)  # (N, C, D, H, W) -> (N, D, H, W, C)
        q, k, v = b.qkv(x).split([b.qk_dim, b.qk_dim, b.dim], dim=-1)
        out = self.mix(q, k, v)
        out = out + b.lce(v.contiguous().permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        return b.proj(out).permute(0, 4, 1, 2, 3)


def window_attention_3d(grid: RegionGrid, heads: int, scale: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Attention within each 3D region of ``grid`` (padding masked), on ``(N, D, H, W, C)`` maps."""
    valid = grid.token_valid() if grid.is_padded else None  # (P, T)

    def mix(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, p, t = q.shape[0], grid.num_regions, grid.region_tokens
        # 4-D (N*P, h, T, d): SDPA's fused CPU kernel takes only 4-D inputs (5-D falls back to the math path)
        qr, kr, vr = (to_regions(x, grid, heads).flatten(0, 1) for x in (q, k, v))
        mask = None if valid is None else valid.to(q.device).repeat(n, 1)[:, None, None, :]  # (N*P, 1, 1, T), keys
        out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scale)  # (N*P, h, T, dv)
        return from_regions(out.view(n, p, heads, t, -1), grid)

    return mix


def full_attention(heads: int, scale: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def mix(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, c = q.shape[0], q.shape[-1]

        def split(t: Tensor) -> Tensor:  # (N, D, H, W, C) -> (N, h, DHW, C/h)
            return t.reshape(n, -1, heads, c // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
        return out.transpose(1, 2).reshape(v.shape)

    return mix


def full_attention_estimate(tokens: int, channels: int, heads: int, batch: int = 1) -> Tuple[float, float]:
    """(GFLOP of fwd+bwd, GB of the score matrix if materialised) for full attention on ``tokens``."""
    pairs = batch * tokens * tokens
    gflop = 2 * 2 * pairs * channels * 3.5 / 1e9  # q.k and p.v, backward ~2.5x forward
    return gflop, batch * heads * tokens * tokens * 4 / 1e9


def _time(call: Callable[[], None], repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        call()
    times: List[float] = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(case: Case, device: torch.device, repeats: int, warmup: int, full_max_gflop: float,
               candidates: Tuple[str, ...]) -> List[str]:
    """Markdown rows ``| case | candidate | seconds | peak MB | note |`` for one case."""
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention3d(CHANNELS, num_heads=HEADS, region_size=case.region_size, topk=case.topk,
                                    side_dwconv=3).to(device)
    grid = RegionGrid.nd_from_region_size(case.size, case.region_size)
    tokens = grid.tokens
    models = {
        "bra3d": bra,
        "window3d": _SameProjections(bra, window_attention_3d(grid, HEADS, bra.scale)),
        "full": _SameProjections(bra, full_attention(HEADS, bra.scale)),
    }
    x = torch.randn(1, CHANNELS, *case.size, device=device, requires_grad=True)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for name in candidates:
        note = ""
        if name == "full":
            gflop, score_gb = full_attention_estimate(tokens, CHANNELS, HEADS)
            note = f"est. {gflop:,.0f} GFLOP fwd+bwd, {score_gb:,.0f} GB if the score matrix were materialised"
            if gflop > full_max_gflop:
                rows.append(f"| {case.name} | full | not run | not run | {note} (over --full-max-gflop "
                            f"{full_max_gflop:g}; free memory {available_memory_bytes(device) / 1e9:.0f} GB) |")
                continue
        elif name == "bra3d":
            note = f"{grid.num_regions} regions of {grid.region_tokens} tokens, topk={case.topk}"
        else:
            note = f"{grid.num_regions} regions of {grid.region_tokens} tokens"
        model = models[name]

        def step() -> None:
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)
            x.grad = None

        print(f"[bra3d] {case.name}: {name}...", file=sys.stderr, flush=True)
        try:
            peak = peak_memory_growth(step, device)
            seconds = _time(step, repeats, warmup, sync)
        except (RuntimeError, MemoryError) as e:  # out of memory: report it as the row
            rows.append(f"| {case.name} | {name} | failed | failed | {str(e).splitlines()[0][:120]} |")
            continue
        rows.append(f"| {case.name} | {name} | {seconds:.3f} | {peak / 2**20:,.0f} | {note} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biformer.bench.bra3d", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES, reverse=True),
                        help="video (16x56x56) and/or volume (96^3); default: both")
    parser.add_argument("--candidates", nargs="+", choices=("bra3d", "window3d", "full"),
                        default=["bra3d", "window3d", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls, median reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the memory pass (default: %(default)s)")
    parser.add_argument("--full-max-gflop", type=float, default=2000.0,
                        help="run full attention only below this estimated fwd+bwd cost (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(f"got --repeats {args.repeats}, --warmup {args.warmup}, --threads {args.threads}; "
                     "expected repeats >= 1, warmup >= 0, threads >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"fwd+bwd, batch 1, C={CHANNELS}, {HEADS} heads, fp32, {device}, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| case | layer | fwd+bwd s | peak MB | note |\n|---|---|---|---|---|")
    for key in args.cases:
        for row in bench_case(CASES[key], device, args.repeats, args.warmup, args.full_max_gflop,
                              tuple(args.candidates)):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
