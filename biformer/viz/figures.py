"""Where queries route and attend: the paper's Fig. 4/6 style figures, as arrays plus a figure.

* :func:`visualize_queries`: for each query point, the image with the query marked, its routed
  regions outlined and coloured by rank, and the query token's attention over the routed tokens.
* :func:`visualize_routing_frequency`: how often each region is routed to, over all query regions,
  for every routed stage, with summary statistics per stage.

Both return a dataclass holding numpy arrays and a :class:`matplotlib.figure.Figure` (built without
pyplot, so nothing stays open; in a notebook the figure displays as the cell's value).
Stages are numbered 1..4 as in the paper; BiFormer's stage 4 uses global attention, so only
stages 1..3 can be shown. Blocks count from 0 within a stage; -1 is the last.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserValueError
from ..ops import RegionGrid
from .capture import CapturedLayer, RoutingCapture, routed_layers, stage_and_block
from .images import ImageLike, input_size, load_image, model_input, to_input_coords
from .._extras import require

__all__ = [
    "QueryView",
    "QueryVisualization",
    "RoutingFrequency",
    "UntrainedModelWarning",
    "UNTRAINED_NOTE",
    "default_queries",
    "input_multiple",
    "routing_statistics",
    "visualize_queries",
    "visualize_routing_frequency",
]

UNTRAINED_NOTE = "RANDOM WEIGHTS: this model is untrained, so its routing and attention say nothing about the image"
HeadChoice = Union[str, int]


class UntrainedModelWarning(UserWarning):
    """A visualisation was drawn from a randomly initialised model."""


@dataclass
class QueryView:
    """One query point at one layer.

    ``point``: ``(x, y)`` in the original image's pixels; ``token``: ``(row, col)`` in the layer's
    map; ``region``: the query's region (row-major); ``routed`` / ``scores``: ``(topk,)`` routed
    regions best first and their routing logits; ``attention``: ``(heads, H, W)`` the query token's
    attention over the layer's map, NaN outside the routed tokens.
    """

    point: Tuple[float, float]
    token: Tuple[int, int]
    region: int
    routed: np.ndarray
    scores: np.ndarray
    attention: np.ndarray

    def to_dict(self) -> Dict[str, Any]:
        return {"point": list(self.point), "token": list(self.token), "region": self.region,
                "routed": self.routed.tolist(), "scores": [round(float(s), 5) for s in self.scores]}


@dataclass
class QueryVisualization:
    image: np.ndarray  # (h, w, 3) uint8, the resized model input
    layer_name: str
    stage: int
    block: int
    grid: RegionGrid
    queries: List[QueryView]
    figure: Any
    untrained: bool = False

    def to_dict(self) -> Dict[str, Any]:
        g = self.grid
        return {"layer": self.layer_name, "stage": self.stage, "block": self.block, "map_size": [g.height, g.width],
                "regions": [g.rows, g.cols], "region_size": [g.region_h, g.region_w], "untrained": self.untrained,
                "queries": [q.to_dict() for q in self.queries]}


@dataclass
class RoutingFrequency:
    """``frequency[stage]``: ``(rows, cols)`` how many query regions route to each region at the
    chosen block; ``stats[stage]``: :func:`routing_statistics` averaged over the stage's blocks."""

    image: np.ndarray
    block: int
    frequency: Dict[int, np.ndarray]
    stats: Dict[int, Dict[str, float]]
    figure: Any
    untrained: bool = False
    grids: Dict[int, RegionGrid] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"block": self.block, "untrained": self.untrained,
                "stages": {str(s): {"frequency": self.frequency[s].astype(int).tolist(), **self.stats[s]}
                           for s in self.frequency}}


# ---- shared helpers --------------------------------------------------------------------------------


def default_queries(image_shape: Sequence[int]) -> List[Tuple[float, float]]:
    """Three query points spread over the image: centre, upper left, lower right."""
    h, w = image_shape[:2]
    return [(0.5 * w, 0.5 * h), (0.3 * w, 0.3 * h), (0.72 * w, 0.72 * h)]


def _forward(model: nn.Module, x: torch.Tensor, attention: Union[bool, Sequence[str]]) -> RoutingCapture:
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with RoutingCapture(model, attention=attention) as capture, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return capture


def input_multiple(model: nn.Module) -> int:
    """The side multiple that lets every routed stage's map split into its ``n_win x n_win`` regions
    with no padding, as at training: the lcm of ``stride * n_win`` over routed stages (112 for
    BiFormer with ``n_win=7`` at strides 4, 8, 16). 32, the total stride, when no layer uses ``n_win``."""
    multiples = [
        4 * 2 ** (stage - 1) * layer.n_win
        for stage, layer in ((stage_and_block(name)[0], layer) for name, layer in routed_layers(model).items())
        if stage is not None and isinstance(layer.n_win, int)
    ]
    return math.lcm(*multiples) if multiples else 32


def _prepare(model: nn.Module, image: ImageLike, size: int,
             max_memory_gb: Optional[float] = None) -> Tuple[np.ndarray, torch.Tensor, np.ndarray]:
    from ..resources import check_aspect, check_memory

    original = load_image(image)
    check_aspect(original.shape[1], original.shape[0])
    multiple = input_multiple(model)
    height, width = input_size(original.shape[:2], size, multiple)
    check_memory(model, height, width, max_memory_gb)  # before anything of that size exists
    cfg = getattr(model, "pretrained_cfg", None) or {}
    x, shown = model_input(original, size, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)),
                           multiple=multiple)
    return original, x, shown


def _warn_untrained(untrained: bool) -> None:
    if untrained:
        warnings.warn(UNTRAINED_NOTE, UntrainedModelWarning, stacklevel=3)


def _new_figure(cols: int, rows: int, aspect: float, panel: float = 3.4) -> Any:
    """A figure of ``rows x cols`` panels ``panel`` inches wide and ``aspect`` (height / width) as tall."""
    require("matplotlib", extra="viz")  # one clear error when the extra is absent
    from matplotlib.figure import Figure

    return Figure(figsize=(panel * cols + 0.6, panel * aspect * rows + 1.0), dpi=110)


def _title(fig: Any, text: str, untrained: bool) -> None:
    if untrained:
        text = f"{text}\n{UNTRAINED_NOTE}"
    fig.suptitle(text, fontsize=10, color="firebrick" if untrained else "black")


def _region_box(grid: RegionGrid, region: int, scale: Tuple[float, float]) -> Tuple[float, float, float, float]:
    """``(x0, y0, width, height)`` of a region in input pixels, clipped to the real (unpadded) map."""
    sy, sx = scale
    r, c = divmod(region, grid.cols)
    y0, x0 = r * grid.region_h, c * grid.region_w
    y1, x1 = min(y0 + grid.region_h, grid.height), min(x0 + grid.region_w, grid.width)
    return x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy


def _draw_grid(ax: Any, grid: RegionGrid, scale: Tuple[float, float]) -> None:
    sy, sx = scale
    for r in range(1, grid.rows):
        ax.axhline(min(r * grid.region_h, grid.height) * sy, color="white", lw=0.5, alpha=0.45)
    for c in range(1, grid.cols):
        ax.axvline(min(c * grid.region_w, grid.width) * sx, color="white", lw=0.5, alpha=0.45)


def _show(ax: Any, image: np.ndarray, dim: float = 1.0) -> None:
    h, w = image.shape[:2]
    ax.imshow((image * dim).astype(np.uint8), extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


# ---- queries ---------------------------------------------------------------------------------------


def _query_view(layer: CapturedLayer, point: Tuple[float, float], point_in: Tuple[float, float],
                input_shape: Sequence[int]) -> QueryView:
    grid = layer.grid
    h_map, w_map = layer.map_size
    row = min(int(point_in[1] * h_map / input_shape[0]), h_map - 1)
    col = min(int(point_in[0] * w_map / input_shape[1]), w_map - 1)
    region = (row // grid.region_h) * grid.cols + col // grid.region_w
    token = (row % grid.region_h) * grid.region_w + col % grid.region_w  # row-major inside the region
    routed = layer.indices[0, region].cpu()  # (topk,)
    weights = layer.attention[0, region, :, token].float().cpu()  # (heads, topk*T)
    heads = weights.shape[0]
    padded = torch.full((heads, grid.padded_h, grid.padded_w), float("nan"))
    for rank, key_region in enumerate(routed.tolist()):
        r, c = divmod(key_region, grid.cols)
        block = weights[:, rank * grid.region_tokens:(rank + 1) * grid.region_tokens]
        padded[:, r * grid.region_h:(r + 1) * grid.region_h, c * grid.region_w:(c + 1) * grid.region_w] = \
            block.reshape(heads, grid.region_h, grid.region_w)
    attention = padded[:, :h_map, :w_map].numpy()  # padded tokens have weight 0 and are cropped
    return QueryView(point, (row, col), region, routed.numpy(), layer.scores[0, region].float().cpu().numpy(), attention)


def _head_maps(view: QueryView, head: HeadChoice) -> List[Tuple[str, np.ndarray]]:
    heads = view.attention.shape[0]
    if head == "mean":
        # every head has NaN at the same (unrouted) tokens, so a plain mean keeps them NaN
        return [(f"token attention, mean of {heads} heads", view.attention.mean(axis=0))]
    if head == "all":
        return [(f"head {i}", view.attention[i]) for i in range(heads)]
    return [(f"head {head} of {heads}", view.attention[int(head)])]


def _check_head(head: HeadChoice, heads: int) -> HeadChoice:
    if head in ("mean", "all"):
        return head
    try:
        index = int(head)
    except (TypeError, ValueError):
        raise UserValueError(f"got head={head!r}, expected 'mean', 'all' or a head index 0..{heads - 1}") from None
    if not 0 <= index < heads:
        raise UserValueError(f"got head={index}, but the layer has {heads} heads (0..{heads - 1})")
    return index


def _draw_routing(ax: Any, image: np.ndarray, grid: RegionGrid, view: QueryView, scale: Tuple[float, float],
                  point_in: Tuple[float, float]) -> None:
    require("matplotlib", extra="viz")  # one clear error when the extra is absent
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    _show(ax, image)
    _draw_grid(ax, grid, scale)
    topk = len(view.routed)
    colours = colormaps["turbo"](np.linspace(0.95, 0.1, max(topk, 2)))[:topk]  # rank 1 red ... rank k blue
    label = topk <= 24
    for rank, region in reversed(list(enumerate(view.routed.tolist()))):
        x0, y0, w, h = _region_box(grid, region, scale)
        ax.add_patch(Rectangle((x0, y0), w, h, facecolor=(*colours[rank][:3], 0.28), edgecolor=colours[rank], lw=2))
        if label:
            ax.text(x0 + 3, y0 + 3, str(rank + 1), color="white", fontsize=7, fontweight="bold", va="top", ha="left",
                    bbox=dict(boxstyle="square,pad=0.1", fc=colours[rank], ec="none", alpha=0.9))
    x0, y0, w, h = _region_box(grid, view.region, scale)
    ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor="white", lw=1.6, ls="--"))
    ax.plot(*point_in, marker="*", ms=16, color="yellow", mec="black", mew=1.2)


def _draw_attention(fig: Any, ax: Any, image: np.ndarray, attention: np.ndarray, point_in: Tuple[float, float]) -> None:
    h, w = image.shape[:2]
    _show(ax, image, dim=0.45)
    masked = np.ma.masked_invalid(attention)
    im = ax.imshow(masked, extent=(0, w, h, 0), cmap="inferno", alpha=0.85, interpolation="nearest",
                   vmin=0.0, vmax=float(np.nanmax(attention)) if np.isfinite(attention).any() else 1.0)
    ax.plot(*point_in, marker="*", ms=16, color="cyan", mec="black", mew=1.2)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.ax.tick_params(labelsize=7)


def visualize_queries(
    model: nn.Module,
    image: ImageLike,
    queries: Optional[Sequence[Tuple[float, float]]] = None,
    stage: int = 3,
    block: int = -1,
    head: HeadChoice = "mean",
    size: int = 224,
    untrained: bool = False,
    name: Optional[str] = None,
    max_memory_gb: Optional[float] = None,
) -> QueryVisualization:
    """Where each query point routes and attends at one BRA layer (the paper's Fig. 4/6).

    Args:
        model: a BiFormer (or any model with BiLevelRoutingAttention layers inside ``stages.i.blocks.j``).
        image: a bundled photo's name (``"astronaut"``, ``"coffee"``, ``"chelsea"``), a path or an array.
        queries: ``(x, y)`` points in the original image's pixels; default :func:`default_queries`.
        stage: 1-based routed stage (BiFormer: 1..3; the paper's figures show stage 3).
        block: block within the stage; -1 is the last.
        head: ``"mean"`` (average over heads), ``"all"`` (one panel per head) or a head index.
        size: shorter side of the model input (rounded to a multiple of 32).
        untrained: the model has random weights; the figure says so and a warning is issued.
        name: the model's name for the title (default: its class name).
        max_memory_gb: refuse inputs estimated to need more (default: half the RAM); see
            :mod:`biformer.resources`. Images more elongated than 16:1 are refused too.
    """
    _warn_untrained(untrained)
    original, x, shown = _prepare(model, image, size, max_memory_gb)
    probe = RoutingCapture(model, attention=False)
    layer_name = probe.layer_name(stage, block)
    capture = _forward(model, x, attention=[layer_name])
    layer = capture.layers[layer_name]
    heads = layer.attention.shape[2]
    head = _check_head(head, heads)
    points = list(queries) if queries else default_queries(original.shape)
    inside = [to_input_coords(p, original.shape, shown.shape) for p in points]
    views = [_query_view(layer, p, p_in, shown.shape) for p, p_in in zip(points, inside)]

    grid = layer.grid
    scale = (shown.shape[0] / layer.map_size[0], shown.shape[1] / layer.map_size[1])
    panels = len(_head_maps(views[0], head))
    fig = _new_figure(1 + panels, len(views), aspect=shown.shape[0] / shown.shape[1] + 0.15)
    block_index = layer.block if layer.block is not None else block
    for i, (view, p_in) in enumerate(zip(views, inside)):
        ax = fig.add_subplot(len(views), 1 + panels, i * (1 + panels) + 1)
        _draw_routing(ax, shown, grid, view, scale, p_in)
        ax.set_title(f"query ({view.point[0]:.0f}, {view.point[1]:.0f}): top-{len(view.routed)} regions\n"
                     f"(1 = best; dashed = own region {view.region})", fontsize=8)
        for j, (label, amap) in enumerate(_head_maps(view, head)):
            ax = fig.add_subplot(len(views), 1 + panels, i * (1 + panels) + 2 + j)
            _draw_attention(fig, ax, shown, amap, p_in)
            ax.set_title(label, fontsize=8)
    _title(fig, f"{name or type(model).__name__} stage {stage}, block {block_index}: {grid.rows}x{grid.cols} regions "
                f"of {grid.region_h}x{grid.region_w} tokens ({scale[0]:.0f} px each), top-{len(views[0].routed)} routed",
           untrained)
    fig.tight_layout()
    return QueryVisualization(shown, layer_name, stage, block_index, grid, views, fig, untrained)


# ---- routing frequency -------------------------------------------------------------------------------


def _frequency(layer: CapturedLayer) -> np.ndarray:
    """``(P,)`` how many (real) query regions route to each region, for the first image."""
    grid = layer.grid
    real = (grid.region_token_counts() > 0).cpu()
    indices = layer.indices[0].cpu()[real]  # (P_real, topk)
    return torch.bincount(indices.reshape(-1), minlength=grid.num_regions).numpy().astype(float)


def routing_statistics(layer: CapturedLayer) -> Dict[str, float]:
    """Summary of one layer's routing over all query regions (first image of the batch).

    * ``entropy``: entropy of the routed-to frequency over regions, divided by ``log(P)``
      (1 = every region equally often; 0 = all queries route to one region);
    * ``top_region_share``: share of all routings that go to the most routed-to region;
    * ``self_routed``: fraction of query regions that route to themselves;
    * ``mean_distance``: mean Chebyshev distance, in regions, from a query region to its routed regions.
    """
    grid = layer.grid
    freq = _frequency(layer)
    p = freq / freq.sum()
    nonzero = p[p > 0]
    real = (grid.region_token_counts() > 0).cpu()
    query_regions = torch.arange(grid.num_regions)[real]
    indices = layer.indices[0].cpu()[real]  # (P_real, topk)
    q_r, q_c = query_regions // grid.cols, query_regions % grid.cols
    k_r, k_c = indices // grid.cols, indices % grid.cols
    distance = torch.maximum((k_r - q_r[:, None]).abs(), (k_c - q_c[:, None]).abs()).float()
    return {
        "entropy": float(-(nonzero * np.log(nonzero)).sum() / math.log(grid.num_regions)) if grid.num_regions > 1 else 0.0,
        "top_region_share": float(p.max()),
        "self_routed": float((indices == query_regions[:, None]).any(-1).float().mean()),
        "mean_distance": float(distance.mean()),
    }


def visualize_routing_frequency(
    model: nn.Module,
    image: ImageLike,
    block: int = -1,
    size: int = 224,
    untrained: bool = False,
    name: Optional[str] = None,
    max_memory_gb: Optional[float] = None,
) -> RoutingFrequency:
    """How often each region is routed to, over all query regions, at block ``block`` of every routed
    stage; statistics (:func:`routing_statistics`) are averaged over all blocks of each stage."""
    require("matplotlib", extra="viz")  # one clear error when the extra is absent
    from matplotlib import colormaps

    _warn_untrained(untrained)
    _, x, shown = _prepare(model, image, size, max_memory_gb)
    capture = _forward(model, x, attention=False)
    stages = capture.stages()
    frequency, stats, grids = {}, {}, {}
    for stage in stages:
        layer = capture.layer(stage, block)
        frequency[stage] = _frequency(layer).reshape(layer.grid.rows, layer.grid.cols)
        grids[stage] = layer.grid
        per_block = [routing_statistics(l) for l in capture.layers.values() if l.stage == stage]
        stats[stage] = {k: float(np.mean([s[k] for s in per_block])) for k in per_block[0]}
        stats[stage]["blocks"] = len(per_block)
        stats[stage]["topk"] = int(layer.indices.shape[-1])

    fig = _new_figure(len(stages), 1, aspect=shown.shape[0] / shown.shape[1] + 0.1, panel=4.2)
    h, w = shown.shape[:2]
    for i, stage in enumerate(stages):
        grid, freq = grids[stage], frequency[stage]
        ax = fig.add_subplot(1, len(stages), i + 1)
        _show(ax, shown, dim=0.6)
        # the region grid covers the padded map; scale it so real tokens line up with the image
        layer = capture.layer(stage, block)
        sy, sx = h / layer.map_size[0], w / layer.map_size[1]
        extent = (0, grid.padded_w * sx, grid.padded_h * sy, 0)
        im = ax.imshow(freq, extent=extent, cmap=colormaps["magma"], alpha=0.7, interpolation="nearest", vmin=0)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        _draw_grid(ax, grid, (sy, sx))
        if grid.num_regions <= 100:
            for region in range(grid.num_regions):
                x0, y0, bw, bh = _region_box(grid, region, (sy, sx))
                r, c = divmod(region, grid.cols)
                if bw > 0 and bh > 0 and freq[r, c] > 0:
                    ax.text(x0 + bw / 2, y0 + bh / 2, f"{freq[r, c]:.0f}", color="white", fontsize=7, ha="center", va="center")
        s = stats[stage]
        ax.set_title(f"stage {stage}, block {layer.block} (top-{s['topk']} of {grid.num_regions})\n"
                     f"stage mean over {s['blocks']} blocks: entropy {s['entropy']:.2f}, "
                     f"self {100 * s['self_routed']:.0f}%, dist {s['mean_distance']:.1f}", fontsize=8)
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cbar.set_label("query regions routing here", fontsize=7)
        cbar.ax.tick_params(labelsize=7)
    _title(fig, f"{name or type(model).__name__}: how often each region is routed to, over all query regions", untrained)
    fig.tight_layout()
    return RoutingFrequency(shown, block, frequency, stats, fig, untrained, grids)
