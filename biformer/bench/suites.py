"""The three parts of ``biformer bench``: BRA layers, whole models, efficiency.

Each part builds its candidates, measures them with :func:`~biformer.bench.harness.run_group`
(interleaved, medians, peak memory) and returns plain dicts, ready for JSON and the report.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserValueError
from ..layers import BiLevelRoutingAttention
from ..ops import available_backends
from .baseline import full_attention, original_bra, original_bra_peak_bytes, use_original_bra
from .harness import Bench, Outcome, run_group, tensor_bytes
from .macs import count_macs, resolve_mac_source

__all__ = [
    "BenchConfig",
    "LayerCase",
    "T_STAGE_CASES",
    "LARGE_CASES",
    "ORIGINAL",
    "FULL_ATTENTION",
    "OURS",
    "MODELS",
    "original_name",
    "measure_matmul_rate",
    "run_layers",
    "run_models",
]

ORIGINAL = "original"  # the original algorithm (baseline.original_bra)
FULL_ATTENTION = "full_sdpa"  # SDPA over the whole map
OURS = "auto"  # our layer with its default backend choice
MODELS = ("biformer_tiny", "biformer_small", "swin_tiny_patch4_window7_224", "convnext_tiny")
WITH_ORIGINAL = ("biformer_tiny", "biformer_small")
MATMUL = "matmul"

Log = Callable[[str], None]


def original_name(model_name: str) -> str:
    return f"{model_name}:{ORIGINAL}"


@dataclass(frozen=True)
class LayerCase:
    """One BRA layer input: batch, channels (= qk_dim), map, routing."""

    name: str
    batch: int
    dim: int
    height: int
    width: int
    topk: int
    num_heads: int
    n_win: int = 7
    modes: Tuple[str, ...] = ("fwd", "fwd_bwd")
    large: bool = False  # measured with the large-map repeats, no extra warm-up
    candidates: Optional[Tuple[str, ...]] = None  # None: all

    @property
    def shape(self) -> str:
        return (f"{self.batch}x{self.dim}x{self.height}x{self.width} n_win={self.n_win} "
                f"topk={self.topk} heads={self.num_heads}")


T_STAGE_CASES = (
    LayerCase("S1", 8, 64, 56, 56, topk=1, num_heads=2),
    LayerCase("S2", 8, 128, 28, 28, topk=4, num_heads=4),
    LayerCase("S3", 8, 256, 14, 14, topk=16, num_heads=8),
)
LARGE_CASES = (
    LayerCase("L448", 1, 32, 448, 448, topk=4, num_heads=1, large=True),
    LayerCase("L600x500", 1, 32, 600, 500, topk=4, num_heads=1, modes=("fwd_bwd",), large=True,
              candidates=(OURS, ORIGINAL, FULL_ATTENTION)),
)


@dataclass
class BenchConfig:
    """Everything a run depends on; recorded in the JSON."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    repeats: int = 7
    warmup: int = 2
    large_repeats: int = 2
    layer_cases: Tuple[LayerCase, ...] = T_STAGE_CASES + LARGE_CASES
    backends: Optional[Tuple[str, ...]] = None  # None: every available backend
    models: Tuple[str, ...] = MODELS
    image_size: int = 224
    infer_batches: Tuple[int, ...] = (1, 8)
    train_batch: int = 8
    matmul_size: int = 1024
    mac_source: str = "auto"
    memory_budget_bytes: Optional[int] = None  # larger estimated peaks are skipped; None: no limit
    max_call_s: float = 60.0  # candidates predicted to take longer per call are skipped
    min_sample_s: float = 0.05
    seed: int = 0
    quick: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UserValueError(f"got dtype={self.dtype!r}, expected a floating dtype such as float32 or bfloat16")
        return dtype

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["layer_cases"] = [asdict(c) for c in self.layer_cases]
        return d


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.1f} GB"


# --------------------------------------------------------------------------------------------
# matmul: the machine's achievable multiply-add rate


def _matmul_bench(config: BenchConfig) -> Tuple[Bench, int]:
    n = config.matmul_size
    gen = torch.Generator().manual_seed(config.seed)
    a, b = (torch.randn(n, n, generator=gen).to(config.torch_device, config.torch_dtype) for _ in range(2))
    return Bench(MATMUL, lambda: torch.mm(a, b), tensor_bytes(a, b)), n ** 3


def measure_matmul_rate(config: BenchConfig, repeats: int = 3) -> float:
    """Multiply-adds per second of a plain ``n x n`` matmul (a quick calibration for time predictions)."""
    bench, macs = _matmul_bench(config)
    outcome = run_group([bench], repeats=repeats, warmup=2, device=config.torch_device,
                        min_sample_s=config.min_sample_s, measure_memory=False)[MATMUL]
    return macs / outcome.median_s


# --------------------------------------------------------------------------------------------
# (a) BRA layers


def _layer_candidates(case: LayerCase, backends: Sequence[str]) -> List[str]:
    names = [ORIGINAL, FULL_ATTENTION, OURS] + [b for b in backends if b != OURS]
    return [n for n in names if case.candidates is None or n in case.candidates]


def _full_attention_macs(case: LayerCase, backward: bool) -> float:
    tokens = case.height * case.width
    macs = case.batch * tokens * tokens * 2 * case.dim  # q @ k^T and p @ v
    return macs * (3.5 if backward else 1.0)  # flash backward recomputes p, then three matmuls


def _skip_reason(name: str, case: LayerCase, mode: str, config: BenchConfig, matmul_rate: float) -> Optional[str]:
    """Why a baseline cannot be run on this case (it is known to be too large), or None."""
    backward = mode == "fwd_bwd"
    if name == ORIGINAL:
        need = original_bra_peak_bytes(case.batch, case.height, case.width, case.dim, qk_dim=case.dim,
                                       num_heads=case.num_heads, n_win=case.n_win, topk=case.topk,
                                       backward=backward, element_size=_element_size(config))
        if config.memory_budget_bytes is not None and need > config.memory_budget_bytes:
            return (f"not run: estimated peak {_gb(need)} (analytic, original_bra_peak_bytes) "
                    f"exceeds the memory budget {_gb(config.memory_budget_bytes)}")
    if name == FULL_ATTENTION:
        seconds = _full_attention_macs(case, backward) / matmul_rate
        if seconds > config.max_call_s:
            return (f"not run: {_full_attention_macs(case, backward) / 1e12:.1f} TMAC of quadratic attention, "
                    f"predicted {seconds:.0f} s per call at the measured matmul rate (limit {config.max_call_s:.0f} s)")
    return None


def _element_size(config: BenchConfig) -> int:
    return torch.empty((), dtype=config.torch_dtype).element_size()


def _layer_forward(name: str, layer: BiLevelRoutingAttention) -> Callable[[Tensor], Tensor]:
    if name == ORIGINAL:
        return lambda x: original_bra(layer, x)
    if name == FULL_ATTENTION:
        return lambda x: full_attention(layer, x)
    return layer


def _layer_call(forward: Callable[[Tensor], Tensor], layer: nn.Module, x: Tensor, grad_out: Tensor,
                mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        def call() -> Any:
            with torch.inference_mode():
                return forward(x)
        return call

    x_grad = x.detach().clone().requires_grad_(True)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x_grad.grad = None
        forward(x_grad).backward(grad_out)
    return step


def run_layer_case(case: LayerCase, config: BenchConfig, matmul_rate: float, log: Log) -> Dict[str, Any]:
    """All candidates of one layer case, every mode, interleaved in one group."""
    device, dtype = config.torch_device, config.torch_dtype
    torch.manual_seed(config.seed)
    base = BiLevelRoutingAttention(case.dim, num_heads=case.num_heads, n_win=case.n_win, topk=case.topk,
                                   layout="NHWC").to(device, dtype)
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn(case.batch, case.height, case.width, case.dim, generator=gen).to(device, dtype)
    grad_out = torch.randn(x.shape, generator=gen).to(device, dtype)
    backends = config.backends or available_backends()
    names = _layer_candidates(case, backends)

    layers: Dict[str, BiLevelRoutingAttention] = {}
    for name in names:
        layer = copy.deepcopy(base)
        if name not in (ORIGINAL, FULL_ATTENTION):
            layer.backend = name
        layers[name] = layer

    benches = []
    for mode in case.modes:
        for name in names:
            layer = layers[name]
            benches.append(Bench(
                f"{name}/{mode}",
                _layer_call(_layer_forward(name, layer), layer, x, grad_out, mode),
                tensor_bytes(layer, x, grad_out),
                _skip_reason(name, case, mode, config, matmul_rate),
            ))
    repeats = config.large_repeats if case.large else config.repeats
    warmup = 1 if case.large else config.warmup
    log(f"[layers] {case.name} ({case.shape}): {len(names)} candidates x {len(case.modes)} modes, "
        f"{repeats} rounds")
    outcomes = run_group(benches, repeats=repeats, warmup=warmup, device=device,
                         min_sample_s=config.min_sample_s, log=log)
    candidates: Dict[str, Dict[str, Any]] = {}
    for name in names:
        entry: Dict[str, Any] = {mode: outcomes[f"{name}/{mode}"].to_dict() for mode in case.modes}
        if name == ORIGINAL:
            entry["estimated_peak_bytes"] = {
                mode: original_bra_peak_bytes(case.batch, case.height, case.width, case.dim, qk_dim=case.dim,
                                              num_heads=case.num_heads, n_win=case.n_win, topk=case.topk,
                                              backward=mode == "fwd_bwd", element_size=_element_size(config))
                for mode in case.modes
            }
        candidates[name] = entry
    _check_outputs(case, layers, x, candidates)
    return {"case": asdict(case), "shape": case.shape, "candidates": candidates}


def _check_outputs(case: LayerCase, layers: Dict[str, BiLevelRoutingAttention], x: Tensor,
                   candidates: Dict[str, Dict[str, Any]]) -> None:
    """Record each measured candidate's largest deviation from the original (when the original ran)."""
    if case.large or not candidates.get(ORIGINAL, {}).get("fwd", {}).get("status") == "ok":
        return
    with torch.inference_mode():
        expected = original_bra(layers[ORIGINAL], x)
        for name, layer in layers.items():
            if name in (ORIGINAL, FULL_ATTENTION) or candidates[name]["fwd"]["status"] != "ok":
                continue
            candidates[name]["max_abs_diff_vs_original"] = (layer(x) - expected).abs().max().item()


def run_layers(config: BenchConfig, matmul_rate: float, log: Log) -> List[Dict[str, Any]]:
    return [run_layer_case(case, config, matmul_rate, log) for case in config.layer_cases]


# --------------------------------------------------------------------------------------------
# (b) whole models, (c) efficiency


def _create_model(name: str) -> nn.Module:
    import timm

    import biformer  # noqa: F401 - registers the BiFormer models with timm

    return timm.create_model(name, pretrained=False, num_classes=1000)


def _infer_call(model: nn.Module, x: Tensor) -> Callable[[], Any]:
    def call() -> Any:
        model.eval()
        with torch.inference_mode():
            return model(x)
    return call


def _train_call(model: nn.Module, x: Tensor, labels: Tensor) -> Tuple[Callable[[], Any], torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    return step, optimizer


def infer_mode(batch: int) -> str:
    return f"infer_b{batch}"


def train_mode(batch: int) -> str:
    return f"train_b{batch}"


def run_models(
    config: BenchConfig,
    log: Log,
    *,
    model_names: Sequence[str],
    modes: Sequence[str],
    with_matmul: bool,
    with_macs: bool,
) -> Dict[str, Any]:
    """Whole models (and their originals) in every mode, plus optionally the matmul, interleaved.

    ``modes`` are ``infer_b{N}`` and ``train_b{N}`` names. Returns per-candidate outcomes, params,
    and (``with_macs``) multiply-adds per image and the efficiency table.
    """
    device, dtype = config.torch_device, config.torch_dtype
    models: Dict[str, nn.Module] = {}
    for name in model_names:
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        models[name] = _create_model(name).to(device, dtype)
        log(f"[models] built {name} ({time.perf_counter() - start:.1f} s)")
        if name in WITH_ORIGINAL:
            original = copy.deepcopy(models[name])  # same weights, original algorithm
            if use_original_bra(original) == 0:
                raise ValueError(f"model {name!r} has no BiLevelRoutingAttention to swap")
            models[original_name(name)] = original

    gen = torch.Generator().manual_seed(config.seed)
    size = config.image_size
    batches = sorted({int(m.split("_b")[1]) for m in modes})
    images = {b: torch.randn(b, 3, size, size, generator=gen).to(device, dtype) for b in batches}
    labels = {b: torch.randint(0, 1000, (b,), generator=gen).to(device) for b in batches}

    benches: List[Bench] = []
    for name, model in models.items():
        for mode in modes:
            batch = int(mode.split("_b")[1])
            x = images[batch]
            if mode.startswith("infer"):
                benches.append(Bench(f"{name}/{mode}", _infer_call(model, x), tensor_bytes(model, x)))
            else:
                step, _ = _train_call(model, x, labels[batch])
                benches.append(Bench(f"{name}/{mode}", step, tensor_bytes(model, x, labels[batch])))
    matmul_macs = 0
    if with_matmul:
        bench, matmul_macs = _matmul_bench(config)
        benches.append(bench)
    log(f"[models] {len(models)} models x {len(modes)} modes{' + matmul' if with_matmul else ''}, "
        f"{config.repeats} rounds")
    outcomes = run_group(benches, repeats=config.repeats, warmup=config.warmup, device=device,
                         min_sample_s=config.min_sample_s, log=log)

    result: Dict[str, Any] = {"image_size": size, "modes": list(modes), "candidates": {}}
    for name, model in models.items():
        entry: Dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
        for mode in modes:
            outcome = outcomes[f"{name}/{mode}"]
            entry[mode] = outcome.to_dict()
            batch = int(mode.split("_b")[1])
            entry[mode]["img_per_s"] = batch / outcome.median_s if outcome.median_s else None
        result["candidates"][name] = entry
    if with_matmul:
        matmul = outcomes[MATMUL]
        result["matmul"] = {"size": config.matmul_size, **matmul.to_dict(),
                            "macs_per_s": matmul_macs / matmul.median_s if matmul.median_s else None}
    if with_macs:
        result["efficiency"] = _efficiency(config, models, result, log)
    return result


def _efficiency(config: BenchConfig, models: Dict[str, nn.Module], result: Dict[str, Any], log: Log) -> Dict[str, Any]:
    """Achieved multiply-adds per second of each model (largest inference batch) against the matmul."""
    source = resolve_mac_source(config.mac_source)
    infer_modes = [m for m in result["modes"] if m.startswith("infer")]
    mode = max(infer_modes, key=lambda m: int(m.split("_b")[1]))
    matmul_rate = result.get("matmul", {}).get("macs_per_s")
    rows: Dict[str, Any] = {}
    macs_of: Dict[str, int] = {}
    for name, model in models.items():
        base = name.split(":")[0]
        if base not in macs_of:  # the original computes the same algorithm: same count
            start = time.perf_counter()
            macs_of[base] = count_macs(model, (config.image_size, config.image_size), source)
            log(f"[efficiency] {base}: {macs_of[base] / 1e9:.2f} GMAC/image ({source}, "
                f"{time.perf_counter() - start:.1f} s)")
        img_per_s = result["candidates"][name][mode]["img_per_s"]
        rate = macs_of[base] * img_per_s if img_per_s else None
        rows[name] = {
            "macs_per_image": macs_of[base],
            "img_per_s": img_per_s,
            "macs_per_s": rate,
            "fraction_of_matmul": rate / matmul_rate if rate and matmul_rate else None,
        }
    return {"mac_source": source, "mode": mode, "matmul_macs_per_s": matmul_rate, "models": rows}


def geometric_mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))
