"""Equal-interval pooling of frame features: pyramid nodes, DTPP bins and DATP segments alike.

A partition of a video of T frames into ``p`` parts has part k = 1..p covering frames [s, e) with
``s = floor((k-1) T / p)`` and ``e = max(floor(k T / p), s + 1)``, clamped to T: the pyramid node
rule of :mod:`aggregator.nodes` for any ``p``, so every part has at least one frame and the parts
``(1, 2, 4, ..., 2^(D-1))`` are exactly the nodes of a D-level pyramid, in the same order.

An :class:`Intervals` names the fixed-size summary ``[M, d]`` a head reads (``M = sum(parts)``):
heads compute it from padded frames in ``forward`` and take it precomputed (from the node cache)
in ``forward_nodes``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from aggregator.nodes import batch_interval_bounds, interval_bounds, interval_maxes, interval_means

__all__ = [
    "Intervals",
    "PyramidLeaves",
    "batch_interval_bounds",
    "batch_pool_intervals",
    "interval_bounds",
    "pool_intervals",
    "pyramid_mix",
]

PoolKind = Literal["mean", "max"]


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
        if depth < 1:
            raise ValueError(f"pyramid depth must be >= 1, got {depth}")
        return cls(tuple(1 << level for level in range(depth)), kind)

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


def pool_intervals(x: np.ndarray, spec: Intervals) -> np.ndarray:
    """``[M, d]`` float32 summary of one video's frame features ``x [T, d]``.

    Means use float64 prefix sums (O(T d) whatever M is), like :func:`aggregator.nodes.node_means`.
    """
    if spec.kind == "max":
        return interval_maxes(x, spec.parts)
    return interval_means(x, spec.parts)


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
    nodes = interval_bounds(n_frames, Intervals.pyramid(depth).parts)  # [M, 2]
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
