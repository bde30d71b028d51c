"""Equal-interval pooling of frame features: pyramid nodes, DTPP bins and DATP segments alike.

A partition of a video of T frames into ``p`` parts has part k = 1..p covering frames [s, e) with
``s = floor((k-1) T / p)`` and ``e = max(floor(k T / p), s + 1)``, clamped to T, so every part has
at least one frame. An :class:`Intervals` names several partitions at once (``parts``) and how
they are pooled (``kind``: mean or max): the fixed-size summary ``[M, d]``, ``M = sum(parts)``,
that a head reads. Heads compute it from padded frames (:func:`batch_pool_intervals`) and the node
cache from one video at a time (:func:`pool_intervals`); both follow the same bounds.

The temporal pyramid of the multiple aggregation paper is the partitions
``(1, 2, 4, ..., 2^(D-1))``: node (k, l), levels l = 1..D and k = 1..2^(l-1), is part k of level
l, and nodes are ordered level by level, left to right (node index ``n = 2^(l-1) - 1 + (k-1)``).
A node's value does not depend on D, so depth-6 nodes (63) serve every depth <= 6. Means come
from prefix sums: O(T d) per video whatever M is. :class:`PyramidLeaves` holds the nodes as their
last level and a mixing matrix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "Intervals",
    "PoolKind",
    "PyramidLeaves",
    "batch_interval_bounds",
    "batch_pool_intervals",
    "interval_bounds",
    "leaf_nodes",
    "n_nodes",
    "node_bounds",
    "node_level_index",
    "node_maxes",
    "node_means",
    "pool_intervals",
    "pyramid_mix",
    "pyramid_parts",
]

PoolKind = Literal["mean", "max"]


# ------------------------------------------------------------------------------- the pyramid
def n_nodes(depth: int) -> int:
    """Number of nodes of a pyramid of ``depth`` levels: 2^D - 1."""
    if depth < 1:
        raise ValueError(f"pyramid depth must be >= 1, got {depth}")
    return (1 << depth) - 1


def node_level_index(node: int) -> tuple[int, int]:
    """(level l, position k), both 1-based, of node index ``node``."""
    if node < 0:
        raise ValueError(f"node index must be >= 0, got {node}")
    level = (node + 1).bit_length()
    return level, node - ((1 << (level - 1)) - 1) + 1


def pyramid_parts(depth: int) -> tuple[int, ...]:
    """Parts per level of a ``depth``-level pyramid: ``(1, 2, 4, ..., 2^(D-1))``."""
    n_nodes(depth)  # validates depth
    return tuple(1 << (level - 1) for level in range(1, depth + 1))


def leaf_nodes(depth: int) -> slice:
    """Node indices of the last level (the ``2^(D-1)`` leaves) of a ``depth``-level pyramid."""
    first = n_nodes(depth - 1) if depth > 1 else 0
    return slice(first, n_nodes(depth))


@dataclass(frozen=True)
class Intervals:
    """Partitions of the time axis into ``parts`` equal intervals each, pooled by ``kind``."""

    parts: tuple[int, ...]
    kind: PoolKind = "mean"

    def __post_init__(self) -> None:
        if not self.parts or any(int(p) != p or p < 1 for p in self.parts):
            raise ValueError(f"parts must be positive integers, got {self.parts!r}")
        if self.kind not in ("mean", "max"):
            raise ValueError(f"kind must be 'mean' or 'max', got {self.kind!r}")
        object.__setattr__(self, "parts", tuple(int(p) for p in self.parts))

    @classmethod
    def pyramid(cls, depth: int, kind: PoolKind = "mean") -> Intervals:
        """The ``2^depth - 1`` nodes of a pyramid of ``depth`` levels."""
        return cls(pyramid_parts(depth), kind)

    @property
    def count(self) -> int:
        """Number of intervals M."""
        return sum(self.parts)

    def node_indices(self) -> list[int] | None:
        """Indices of these intervals in the pyramid node order, or None when a part count is
        not a power of two (then they are not pyramid nodes)."""
        out: list[int] = []
        for p in self.parts:
            if p & (p - 1):
                return None
            out.extend(range(p - 1, 2 * p - 1))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"parts": list(self.parts), "kind": self.kind}


# ------------------------------------------------------------------------------- bounds
def interval_bounds(n_frames: int, parts: tuple[int, ...]) -> np.ndarray:
    """``[sum(parts), 2]`` frame intervals [s, e): each ``p`` in ``parts`` splits T into p parts."""
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got n_frames={n_frames}")
    rows = []
    for p in parts:
        for k in range(1, p + 1):
            s = min(((k - 1) * n_frames) // p, n_frames - 1)
            e = min(max((k * n_frames) // p, s + 1), n_frames)
            rows.append((s, e))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def batch_interval_bounds(
    lengths: torch.Tensor, parts: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end frame of every interval for a batch: two ``[B, sum(parts)]`` long tensors."""
    lengths = lengths.to(torch.long)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    if (lengths < 1).any():
        raise ValueError(f"every video needs at least one frame, got lengths {lengths.tolist()}")
    starts, ends = [], []
    for p in parts:
        k = torch.arange(1, p + 1, device=lengths.device)
        s = torch.div((k - 1)[None, :] * lengths[:, None], p, rounding_mode="floor")
        s = torch.minimum(s, lengths[:, None] - 1)
        e = torch.div(k[None, :] * lengths[:, None], p, rounding_mode="floor")
        e = torch.minimum(torch.maximum(e, s + 1), lengths[:, None])
        starts.append(s)
        ends.append(e)
    return torch.cat(starts, 1), torch.cat(ends, 1)


def node_bounds(n_frames: int, depth: int) -> np.ndarray:
    """``[2^D - 1, 2]`` int array of node intervals [s, e) for a video of ``n_frames`` frames."""
    return interval_bounds(n_frames, pyramid_parts(depth))


# ------------------------------------------------------------------------------- one video
def pool_intervals(x: np.ndarray, spec: Intervals) -> np.ndarray:
    """``[M, d]`` float32 summary of one video's frame features ``x [T, d]``.

    Means use float64 prefix sums (O(T d) whatever M is); maxima one interval at a time.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected frame features [T, d], got shape {x.shape}")
    bounds = interval_bounds(x.shape[0], spec.parts)
    if spec.kind == "max":
        return np.stack([x[s:e].max(axis=0) for s, e in bounds]).astype(np.float32)
    csum = np.zeros((x.shape[0] + 1, x.shape[1]), dtype=np.float64)
    np.cumsum(x, axis=0, dtype=np.float64, out=csum[1:])
    counts = (bounds[:, 1] - bounds[:, 0]).astype(np.float64)[:, None]
    return ((csum[bounds[:, 1]] - csum[bounds[:, 0]]) / counts).astype(np.float32)


def node_means(x: np.ndarray, depth: int) -> np.ndarray:
    """``[2^D - 1, d]`` pyramid node means of frame features ``x [T, d]`` (float32)."""
    return pool_intervals(x, Intervals.pyramid(depth))


def node_maxes(x: np.ndarray, depth: int) -> np.ndarray:
    """``[2^D - 1, d]`` pyramid node maxima of frame features ``x [T, d]`` (float32)."""
    return pool_intervals(x, Intervals.pyramid(depth, "max"))


# ------------------------------------------------------------------------------- padded batches
def batch_pool_intervals(x: torch.Tensor, lengths: torch.Tensor, spec: Intervals) -> torch.Tensor:
    """Differentiable interval summaries of a padded batch.

    Args:
        x: ``[B, T, d]`` frame features; anything past ``lengths`` (even NaN) is ignored.
        lengths: ``[B]`` number of valid frames per video (1 <= length <= T).
        spec: which intervals, pooled how.

    Returns:
        ``[B, M, d]`` with ``M = spec.count``, intervals in ``spec`` order.
    """
    if x.dim() != 3:
        raise ValueError(f"expected x of shape [B, T, d], got {tuple(x.shape)}")
    b, t, _ = x.shape
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [{b}], got shape {tuple(lengths.shape)}")
    lengths = lengths.to(x.device)
    if int(lengths.max()) > t:
        raise ValueError(f"lengths {lengths.tolist()} exceed the padded length T={t}")
    starts, ends = batch_interval_bounds(lengths, spec.parts)  # [B, M]
    frame = torch.arange(t, device=x.device)
    inside = (frame[None, None, :] >= starts[..., None]) & (frame[None, None, :] < ends[..., None])
    if spec.kind == "max":
        out = []
        for m in range(starts.shape[1]):  # one interval at a time keeps memory at O(B T d)
            masked = x.masked_fill(~inside[:, m, :, None], float("-inf"))  # [B, T, d]
            out.append(masked.amax(dim=1))  # [B, d]
        return torch.stack(out, dim=1)  # [B, M, d]
    valid = frame[None, :] < lengths[:, None]  # [B, T]
    clean = x.masked_fill(~valid[..., None], 0.0)  # padding may hold NaN: zero it, not weight it
    weights = inside.to(x.dtype) / (ends - starts).to(x.dtype)[..., None]  # [B, M, T]
    return torch.bmm(weights, clean)  # [B, M, d]


# ------------------------------------------------------------------------------- pyramid leaves
@functools.lru_cache(maxsize=8192)
def _pyramid_mix(n_frames: int, depth: int) -> np.ndarray:
    leaves = interval_bounds(n_frames, (1 << (depth - 1),))  # [L, 2]
    nodes = node_bounds(n_frames, depth)  # [M, 2]
    n_leaves = leaves.shape[0]
    # every frame is represented by the last leaf starting at or before it: when T >= L the leaves
    # partition the frames; when T < L every leaf is a single frame
    owner = np.searchsorted(leaves[:, 0], np.arange(n_frames), side="right") - 1  # [T]
    counts = np.zeros((n_frames + 1, n_leaves))
    counts[np.arange(1, n_frames + 1), owner] = 1.0
    np.cumsum(counts, axis=0, out=counts)  # counts[t, j]: frames < t owned by leaf j
    share = counts[nodes[:, 1]] - counts[nodes[:, 0]]  # [M, L] frames of node n owned by leaf j
    mix = share / (nodes[:, 1] - nodes[:, 0])[:, None]
    mix.setflags(write=False)
    return mix


def pyramid_mix(n_frames: int, depth: int) -> np.ndarray:
    """``[M, L]`` weights with ``node means = mix @ leaf means`` for a video of ``n_frames``.

    ``M = 2^D - 1`` nodes, ``L = 2^(D-1)`` leaves (the last level). Exact for every T: when
    ``T >= L`` a node is the union of the leaves below it (the floor bounds nest), weighted by
    their frame counts; when ``T < L`` every leaf holds a single frame. Rows sum to 1.
    """
    if n_frames < 1 or depth < 1:
        raise ValueError(f"need n_frames >= 1 and depth >= 1, got {n_frames}, {depth}")
    return _pyramid_mix(int(n_frames), int(depth))


@dataclass
class PyramidLeaves:
    """Pyramid nodes held as their leaves: ``nodes = mix @ leaves`` (see :func:`pyramid_mix`).

    ``leaves [B, L, d]`` and ``mix [B, M, L]``. A head whose first map is linear in the nodes (the
    temporal pyramid) applies it to the L leaves and mixes after, which halves its cost and the
    memory the node tensors need.
    """

    leaves: torch.Tensor
    mix: torch.Tensor

    def nodes(self) -> torch.Tensor:
        """``[B, M, d]`` node means."""
        return torch.bmm(self.mix.to(self.leaves.dtype), self.leaves)

    def to(self, device: torch.device | str) -> PyramidLeaves:
        return PyramidLeaves(self.leaves.to(device), self.mix.to(device))
