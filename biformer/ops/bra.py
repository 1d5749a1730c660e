"""Bi-Level Routing Attention as a functional op, with interchangeable backends.

``bi_level_routing_attention(q, k, v, ...)`` takes channels-last maps ``(N, H, W, C)``:

1. the map is cut into regions (``n_win`` per side, or ``region_size`` tokens per side),
   padding the bottom/right when it does not divide;
2. each query region routes to the ``topk`` key regions with the highest region-mean affinity
   ``scale * mean(q) . mean(k)`` (no gradient flows through this choice);
3. each query token attends to the tokens of its region's routed regions.

Padded tokens get exactly zero weight in both steps and are cropped from the output.

Backends (``backend=``):

* ``"reference"``: readable gather + explicit softmax; the ground truth for the others.
* ``"sdpa"``: the same gather, then ``F.scaled_dot_product_attention`` (no attention matrix kept).
* ``"dense"``: attention over the whole map with routing expressed as a mask; cheaper when regions
  are tiny and ``topk`` is a large share of them.
* ``"flex"``: compiled FlexAttention with a BlockMask built from the routed regions (GPU training
  and inference; CPU inference only). Never chosen by ``"auto"``; see :mod:`biformer.ops.flex`.
* ``"auto"``: picks ``"sdpa"`` or ``"dense"`` per call from a cost estimate (see :mod:`biformer.ops.cost`).

Each backend lives in its own file under :mod:`biformer.ops.backends` with a ``can_run`` that says
why it cannot take an input; :func:`available_backends` asks them.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

from .backends import BACKENDS
from .backends.reference import routed_logits
from .cost import prefer_dense
from .errors import BackendUnavailable
from .gather import gather_routed, region_token_index, routed_key_valid  # noqa: F401  (public helpers)
from .regions import IntOrPair, IntOrTriple, RegionGrid, Routing, resolve_grid, resolve_grid_nd, route, to_regions
from .routing_rule import dense_token_mask as dense_routing_mask  # noqa: F401  (former name)
from .routing_rule import token_region  # noqa: F401

__all__ = [
    "bi_level_routing_attention",
    "bi_level_routing_attention_3d",
    "routed_attention_weights",
    "select_backend",
    "available_backends",
    "BackendUnavailable",
]


def _is_static(grid: RegionGrid) -> bool:
    return isinstance(grid.tokens, int)


def available_backends(
    q: Optional[Tensor] = None,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    *,
    num_heads: Optional[int] = None,
    topk: Optional[int] = None,
    n_win: Optional[IntOrPair] = None,
    region_size: Optional[IntOrPair] = None,
) -> Tuple[str, ...]:
    """Backends that can run on this machine, and, when given, on these inputs and settings.

    ``available_backends()`` lists what this machine (torch build, process state) supports;
    ``available_backends(q, k, v, num_heads=..., topk=..., n_win=...)`` also asks each backend's
    ``can_run`` about these tensors (device, dtype, whether they need gradients).
    """
    grid = None
    if q is not None and (n_win is not None or region_size is not None):
        grid = resolve_grid_nd(q.shape[1:-1], n_win=n_win, region_size=region_size)  # 2D or 3D by q's rank
    return tuple(name for name, b in BACKENDS.items() if b.can_run(q, k, v, grid, topk, num_heads) is None)


def select_backend(grid: RegionGrid, topk: int) -> str:
    """The cheaper of the routed (gather + SDPA) and dense-masked paths, by :mod:`biformer.ops.cost`."""
    if not _is_static(grid):
        return "sdpa"  # symbolic sizes (torch.export with dynamic H, W): one path for every size
    return "dense" if prefer_dense(grid, topk) else "sdpa"


def _auto_backend(q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, topk: int, num_heads: int) -> str:
    """The cost model's choice if it can take this call, else the first ``auto`` backend that can."""
    preferred = select_backend(grid, topk)
    if BACKENDS[preferred].can_run(q, k, v, grid, topk, num_heads) is None:
        return preferred
    for name, b in BACKENDS.items():
        if b.auto and b.can_run(q, k, v, grid, topk, num_heads) is None:
            return name
    return "reference"  # runs everywhere


# --------------------------------------------------------------------------------------------
# the op


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, num_heads: int, layout: str = "(N, H, W, C)") -> None:
    rank = layout.count(",") + 1
    spatial = layout[4:-4]  # "H, W" or "D, H, W"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(
                f"expected {name} of shape {layout}, got a {t.dim()}-D tensor of shape {tuple(t.shape)}"
            )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v must share q's (N, {spatial}), got q {tuple(q.shape)} and v {tuple(v.shape)}"
        )
    if num_heads < 1 or q.shape[-1] % num_heads or v.shape[-1] % num_heads:
        raise ValueError(
            f"got num_heads={num_heads}, which must divide the q/k width {q.shape[-1]} and the v width {v.shape[-1]}"
        )


def _attend(
    q: Tensor, k: Tensor, v: Tensor, grid: RegionGrid, *, num_heads: int, topk: int,
    scale: Optional[float], backend: str, return_routing: bool,
) -> Union[Tensor, Tuple[Tensor, Routing]]:
    """Routing and attention on a resolved 2D or 3D grid: the mechanism both public ops share."""
    if not 1 <= topk <= grid.num_regions:
        raise ValueError(
            f"got topk={topk} but the map has only {grid.num_regions} regions "
            f"({grid.describe()}); expected 1 <= topk <= {grid.num_regions}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "auto":
        backend = _auto_backend(q, k, v, grid, topk, num_heads)
    elif backend not in BACKENDS:
        raise BackendUnavailable(f"got backend={backend!r}, expected 'auto' or one of {tuple(BACKENDS)}")
    else:
        reason = BACKENDS[backend].can_run(q, k, v, grid, topk, num_heads)
        if reason is not None:
            raise BackendUnavailable(reason)

    routing = route(q, k, grid, topk, scale)
    out = BACKENDS[backend].run(q, k, v, routing, num_heads, scale)  # (N, *size, C_v)
    return (out, routing) if return_routing else out


def bi_level_routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_heads: int,
    topk: int,
    n_win: Optional[IntOrPair] = None,
    region_size: Optional[IntOrPair] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_routing: bool = False,
) -> Union[Tensor, Tuple[Tensor, Routing]]:
    """Bi-Level Routing Attention on channels-last maps.

    Args:
        q, k: ``(N, H, W, C_qk)``; ``v``: ``(N, H, W, C_v)``. Heads are packed in the channel
            dimension as ``(num_heads, head_dim)``.
        num_heads: attention heads; routing is shared by all heads.
        topk: key regions each query region attends to.
        n_win / region_size: the region grid, as regions per side or tokens per side (exactly one).
        scale: logit scale for routing and attention; defaults to ``C_qk ** -0.5`` (the whole
            q/k width, as in the original BiFormer, whose checkpoints depend on it).
        backend: ``"auto"``, or one of :func:`available_backends`.
        return_routing: also return the :class:`Routing` (region indices and scores).

    Returns:
        ``(N, H, W, C_v)``, and the routing when asked for.
    """
    _check_inputs(q, k, v, num_heads)
    grid = resolve_grid(q.shape[1], q.shape[2], n_win=n_win, region_size=region_size)
    return _attend(q, k, v, grid, num_heads=num_heads, topk=topk, scale=scale, backend=backend,
                   return_routing=return_routing)


def bi_level_routing_attention_3d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_heads: int,
    topk: int,
    n_win: Optional[IntOrTriple] = None,
    region_size: Optional[IntOrTriple] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_routing: bool = False,
) -> Union[Tensor, Tuple[Tensor, Routing]]:
    """Bi-Level Routing Attention on channels-last volumes or clips, ``(N, D, H, W, C)``.

    The same op as :func:`bi_level_routing_attention` on a 3D region grid: regions are
    ``region_d x region_h x region_w`` blocks, numbered row-major over (depth, rows, cols); maps the
    grid does not divide are padded at the end of every axis and the padding masked exactly as in 2D.
    ``n_win=(d, h, w)`` regions per axis or ``region_size=(d, h, w)`` tokens per axis (an int is
    used for all three). With ``D = 1`` and one region along depth it equals the 2D op on ``q[:, 0]``.
    No compiled custom op is used for 3D (under ``torch.compile`` the sdpa backend runs traced code).

    Returns:
        ``(N, D, H, W, C_v)``, and the :class:`Routing` when asked for.
    """
    _check_inputs(q, k, v, num_heads, layout="(N, D, H, W, C)")
    grid = resolve_grid_nd(q.shape[1:4], n_win=n_win, region_size=region_size)
    return _attend(q, k, v, grid, num_heads=num_heads, topk=topk, scale=scale, backend=backend,
                   return_routing=return_routing)


def routed_attention_weights(
    q: Tensor, k: Tensor, routing: Routing, *, num_heads: int, scale: Optional[float] = None
) -> Tensor:
    """Token attention probabilities ``(N, P, heads, T, topk*T)`` for a given routing.

    Key tokens are ordered as the routed regions (best first), row-major inside each region.
    Padded keys have weight exactly zero. For visualisation; the backends never materialise this.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qr = to_regions(q, routing.grid, num_heads)
    kr = to_regions(k, routing.grid, num_heads)
    return routed_logits(qr, kr, routing, scale).softmax(dim=-1)
