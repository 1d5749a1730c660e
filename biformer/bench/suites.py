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
from .rows import measurement_row
from .runtimes import Setting, infer_call, train_call

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
RowSink = Callable[[Dict[str, Any], List[float]], None]  # a finished row and its raw samples (seconds)


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
    settings: Tuple[Setting, ...] = (Setting(),)  # how the models part runs each model (eager fp32 first)
    model_backends: Tuple[str, ...] = ()  # extra BiFormer candidates with every BRA layer on this backend
    count_macs: bool = True  # GMACs column of the rows (one count per model)
    train: bool = True  # the models part measures a training step too
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


def run_layer_case(case: LayerCase, config: BenchConfig, matmul_rate: float, log: Log,
                   sink: Optional[RowSink] = None) -> Dict[str, Any]:
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
    if sink is not None:
        for name in names:
            diff = candidates[name].get("max_abs_diff_vs_original")
            for mode in case.modes:
                outcome = outcomes[f"{name}/{mode}"]
                row = measurement_row(
                    model=f"bra_layer_{case.name}:{name}", mode="infer" if mode == "fwd" else "train",
                    img_size=case.height, batch_size=case.batch, outcome=outcome.to_dict(),
                    settings={"threads": config.threads, "device": config.device, "dtype": config.dtype},
                    group=f"layers/{case.name}",
                    note=case.shape + (f"; max_abs_diff_vs_original={diff:.1e}" if diff is not None else ""))
                sink(row, outcome.samples_s)
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


def run_layers(config: BenchConfig, matmul_rate: float, log: Log,
               sink: Optional[RowSink] = None) -> List[Dict[str, Any]]:
    return [run_layer_case(case, config, matmul_rate, log, sink) for case in config.layer_cases]


# --------------------------------------------------------------------------------------------
# (b) whole models, (c) efficiency


def _create_model(name: str) -> nn.Module:
    import timm

    import biformer  # noqa: F401 - registers the BiFormer models with timm

    return timm.create_model(name, pretrained=False, num_classes=1000)


def infer_mode(batch: int) -> str:
    return f"infer_b{batch}"


def train_mode(batch: int) -> str:
    return f"train_b{batch}"


def mode_batch(mode: str) -> int:
    return int(mode.split("_b")[1])


@dataclass(frozen=True)
class ModelCandidate:
    """A model as measured: its timm name, how it runs, whether it is the original algorithm, its BRA backend."""

    model: str
    setting: Setting = Setting()
    original: bool = False
    backend: Optional[str] = None  # BRA backend of every routed layer (None: the layer's default)

    @property
    def name(self) -> str:
        base = original_name(self.model) if self.original else self.model
        tags = [t for t in (self.backend, self.setting.label) if t]
        return f"{base}@{'+'.join(tags)}" if tags else base

    @property
    def row_model(self) -> str:
        base = original_name(self.model) if self.original else self.model
        return f"{base}[{self.backend}]" if self.backend else base


class ModelPool:
    """Models built once per run (same seed, same weights) and shared by the candidates that use them."""

    def __init__(self, config: BenchConfig, log: Log) -> None:
        self.config, self.log = config, log
        self._models: Dict[Tuple[str, bool, Optional[str]], nn.Module] = {}
        self._macs: Dict[str, Optional[int]] = {}

    def get(self, candidate: ModelCandidate) -> nn.Module:
        key = (candidate.model, candidate.original, candidate.backend)
        if key not in self._models:
            if candidate.original or candidate.backend:
                model = copy.deepcopy(self.get(ModelCandidate(candidate.model)))  # same weights
                if candidate.original and use_original_bra(model) == 0:
                    raise ValueError(f"model {candidate.model!r} has no BiLevelRoutingAttention to swap")
                for layer in model.modules():
                    if candidate.backend and isinstance(layer, BiLevelRoutingAttention):
                        layer.backend = candidate.backend
            else:
                torch.manual_seed(self.config.seed)
                start = time.perf_counter()
                model = _create_model(candidate.model).to(self.config.torch_device, self.config.torch_dtype)
                self.log(f"[models] built {candidate.model} ({time.perf_counter() - start:.1f} s)")
            self._models[key] = model
        return self._models[key]

    def add(self, name: str, model: nn.Module) -> None:
        """Use ``model`` (moved to the run's device and dtype) for candidates named ``name``."""
        self._models[(name, False, None)] = model.to(self.config.torch_device, self.config.torch_dtype)

    @property
    def counted_macs(self) -> Dict[str, Optional[int]]:
        return dict(self._macs)

    def params(self, model_name: str) -> int:
        return sum(p.numel() for p in self.get(ModelCandidate(model_name)).parameters())

    def macs(self, model_name: str) -> Optional[int]:
        """Multiply-adds per image (paper-style count), or None when counting fails or is switched off."""
        if not self.config.count_macs:
            return None
        if model_name not in self._macs:
            start = time.perf_counter()
            try:
                self._macs[model_name] = count_macs(self.get(ModelCandidate(model_name)),
                                                    (self.config.image_size, self.config.image_size),
                                                    self.config.mac_source)
                self.log(f"[models] {model_name}: {self._macs[model_name] / 1e9:.2f} GMAC/image "
                         f"({time.perf_counter() - start:.1f} s)")
            except Exception as e:  # noqa: BLE001 - a missing count leaves the column empty, not the run
                self.log(f"[models] {model_name}: MACs not counted ({type(e).__name__}: {e})")
                self._macs[model_name] = None
        return self._macs[model_name]


def _inputs(config: BenchConfig, batch: int, num_classes: int) -> Tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(config.seed + batch)
    size = config.image_size
    images = torch.randn(batch, 3, size, size, generator=gen).to(config.torch_device, config.torch_dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(config.torch_device)
    return images, labels


def _model_bench(candidate: ModelCandidate, mode: str, pool: ModelPool, config: BenchConfig) -> Optional[Bench]:
    """The harness entry of ``candidate`` in ``mode``, or None when the setting cannot run the mode."""
    if mode.startswith("train") and not candidate.setting.trains:
        return None
    name = f"{candidate.name}/{mode}"

    def unavailable(reason: str) -> Bench:
        return Bench(name, lambda: None, skip_reason=reason)

    try:
        model = pool.get(candidate)
    except (ValueError, RuntimeError) as e:
        return unavailable(f"not built: {e}")
    images, labels = _inputs(config, mode_batch(mode), getattr(model, "num_classes", 1000))
    if mode.startswith("infer"):
        call, prepare = infer_call(model, images, candidate.setting, config.threads)
        return Bench(name, call, tensor_bytes(model, images), prepare=prepare,
                     measure_memory=candidate.setting.runtime == "eager")
    step, prepare = train_call(model, images, labels, candidate.setting)
    return Bench(name, step, tensor_bytes(model, images, labels), prepare=prepare)


def run_model_group(
    config: BenchConfig,
    pool: ModelPool,
    candidates: Sequence[ModelCandidate],
    modes: Sequence[str],
    log: Log,
    *,
    group: str,
    sink: Optional[RowSink] = None,
    extra: Sequence[Bench] = (),
) -> Dict[str, Outcome]:
    """Measure every candidate in every mode it can run, interleaved in one group; rows go to ``sink``.

    Returns the outcomes by ``"<candidate name>/<mode>"`` (and the names of ``extra`` benches).
    """
    benches = [b for c in candidates for m in modes if (b := _model_bench(c, m, pool, config)) is not None]
    benches += list(extra)
    log(f"[{group}] {len(benches)} candidates, {config.repeats} rounds")
    outcomes = run_group(benches, repeats=config.repeats, warmup=config.warmup, device=config.torch_device,
                         min_sample_s=config.min_sample_s, log=log)
    if sink is not None:
        for candidate in candidates:
            for mode in modes:
                outcome = outcomes.get(f"{candidate.name}/{mode}")
                if outcome is None:
                    continue
                sink(model_row(candidate, mode, outcome, pool, config, group), outcome.samples_s)
    return outcomes


def model_row(candidate: ModelCandidate, mode: str, outcome: Outcome, pool: ModelPool, config: BenchConfig,
              group: str) -> Dict[str, Any]:
    """The timm-style row of one model measurement."""
    info = outcome.info
    notes = [f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()]
    if outcome.setup_s is not None and outcome.setup_s >= 0.5:
        notes.append(f"setup_s={outcome.setup_s:.1f}")
    return measurement_row(
        model=candidate.row_model, mode=mode.split("_b")[0], img_size=config.image_size,
        batch_size=mode_batch(mode), outcome=outcome.to_dict(),
        settings={**candidate.setting.to_dict(), "threads": config.threads, "device": config.device,
                  "dtype": config.dtype},
        params=pool.params(candidate.model), macs_per_image=pool.macs(candidate.model), group=group,
        note="; ".join(notes))


def run_models(
    config: BenchConfig,
    log: Log,
    *,
    model_names: Sequence[str],
    modes: Sequence[str],
    with_matmul: bool,
    with_macs: bool,
    sink: Optional[RowSink] = None,
) -> Dict[str, Any]:
    """Whole models (and their originals) under every setting of ``config.settings``, one group per mode.

    ``modes`` are ``infer_b{N}`` and ``train_b{N}`` names; in each mode all candidates are interleaved
    (the matmul joins the largest inference batch's group). Each group's rows go to ``sink`` as soon
    as it finishes. Returns per-candidate outcomes, params, and (``with_macs``) the efficiency table.
    """
    pool = ModelPool(config, log)
    candidates: List[ModelCandidate] = []
    for name in model_names:
        for setting in config.settings:
            candidates.append(ModelCandidate(name, setting))
            for backend in config.model_backends:
                if name in WITH_ORIGINAL:
                    candidates.append(ModelCandidate(name, setting, backend=backend))
        if name in WITH_ORIGINAL:
            candidates.append(ModelCandidate(name, original=True))

    infer_modes = [m for m in modes if m.startswith("infer")]
    matmul_mode = max(infer_modes, key=mode_batch) if infer_modes else modes[-1]
    matmul_macs = 0
    outcomes: Dict[str, Outcome] = {}
    for mode in modes:
        extra: List[Bench] = []
        if with_matmul and mode == matmul_mode:
            bench, matmul_macs = _matmul_bench(config)
            extra.append(bench)
        outcomes.update(run_model_group(config, pool, candidates, [mode], log, group=f"models/{mode}",
                                        sink=sink, extra=extra))

    result: Dict[str, Any] = {"image_size": config.image_size, "modes": list(modes), "candidates": {}}
    models: Dict[str, nn.Module] = {}
    for candidate in candidates:
        entry: Dict[str, Any] = {"params": pool.params(candidate.model), "setting": candidate.setting.to_dict()}
        for mode in modes:
            outcome = outcomes.get(f"{candidate.name}/{mode}")
            if outcome is None:
                continue
            entry[mode] = outcome.to_dict()
            entry[mode]["img_per_s"] = mode_batch(mode) / outcome.median_s if outcome.median_s else None
        result["candidates"][candidate.name] = entry
        if candidate.setting == Setting() and candidate.backend is None:
            models[candidate.name] = pool.get(candidate)
    if with_matmul:
        matmul = outcomes[MATMUL]
        result["matmul"] = {"size": config.matmul_size, **matmul.to_dict(),
                            "macs_per_s": matmul_macs / matmul.median_s if matmul.median_s else None}
    if with_macs:
        known = {k: v for k, v in pool.counted_macs.items() if v is not None}
        result["efficiency"] = _efficiency(config, models, result, log, known)
    return result


def _efficiency(config: BenchConfig, models: Dict[str, nn.Module], result: Dict[str, Any], log: Log,
                known_macs: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Achieved multiply-adds per second of each model (largest inference batch) against the matmul."""
    source = resolve_mac_source(config.mac_source)
    infer_modes = [m for m in result["modes"] if m.startswith("infer")]
    mode = max(infer_modes, key=lambda m: int(m.split("_b")[1]))
    matmul_rate = result.get("matmul", {}).get("macs_per_s")
    rows: Dict[str, Any] = {}
    macs_of: Dict[str, int] = dict(known_macs or {})  # counted already for the rows
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
