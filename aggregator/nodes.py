"""Temporal pyramid nodes (seed 002): means of frame features over 2^(l-1) equal intervals.

Node (k, l), levels l = 1..D and k = 1..2^(l-1), covers frames [s, e) with
``s = floor((k-1) T / 2^(l-1))`` and ``e = max(floor(k T / 2^(l-1)), s + 1)``, clamped to T, so
every node has at least one frame. Nodes are ordered level by level, left to right: node index
``n = 2^(l-1) - 1 + (k-1)``. A node's value does not depend on D, so depth-6 nodes (63) serve
every depth <= 6. Means come from prefix sums: O(T d) per video whatever D is.
"""

from __future__ import annotations

import numpy as np
import torch


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


def interval_bounds(n_frames: int, parts: tuple[int, ...]) -> np.ndarray:
    """``[sum(parts), 2]`` frame intervals [s, e): each ``p`` in ``parts`` splits T into p parts.

    Part k = 1..p covers ``s = floor((k-1) T / p)``, ``e = max(floor(k T / p), s + 1)``, clamped
    to T: the node rule for any partition (DTPP bins and DATP segments use it too).
    """
    if n_frames < 1:
        raise ValueError(f"a video needs at least one frame, got n_frames={n_frames}")
    rows = []
    for p in parts:
        for k in range(1, p + 1):
            s = min(((k - 1) * n_frames) // p, n_frames - 1)
            e = min(max((k * n_frames) // p, s + 1), n_frames)
            rows.append((s, e))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def interval_means(x: np.ndarray, parts: tuple[int, ...]) -> np.ndarray:
    """``[sum(parts), d]`` interval means of ``x [T, d]`` (float64 prefix sums, float32 out)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected frame features [T, d], got shape {x.shape}")
    bounds = interval_bounds(x.shape[0], parts)
    csum = np.zeros((x.shape[0] + 1, x.shape[1]), dtype=np.float64)
    np.cumsum(x, axis=0, dtype=np.float64, out=csum[1:])
    counts = (bounds[:, 1] - bounds[:, 0]).astype(np.float64)[:, None]
    return ((csum[bounds[:, 1]] - csum[bounds[:, 0]]) / counts).astype(np.float32)


def interval_maxes(x: np.ndarray, parts: tuple[int, ...]) -> np.ndarray:
    """``[sum(parts), d]`` interval maxima of ``x [T, d]``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected frame features [T, d], got shape {x.shape}")
    bounds = interval_bounds(x.shape[0], parts)
    return np.stack([x[s:e].max(axis=0) for s, e in bounds]).astype(np.float32)


def node_bounds(n_frames: int, depth: int) -> np.ndarray:
    """``[2^D - 1, 2]`` int array of frame intervals [s, e) for a video of ``n_frames`` frames."""
    return interval_bounds(n_frames, pyramid_parts(depth))


def node_means(x: np.ndarray, depth: int) -> np.ndarray:
    """``[M, d]`` node means of frame features ``x [T, d]`` (float64 prefix sums, float32 out)."""
    return interval_means(x, pyramid_parts(depth))


def node_maxes(x: np.ndarray, depth: int) -> np.ndarray:
    """``[M, d]`` node maxima of frame features ``x [T, d]``."""
    return interval_maxes(x, pyramid_parts(depth))


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


def batch_node_bounds(lengths: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end frame of every node for a batch: two ``[B, M]`` long tensors."""
    return batch_interval_bounds(lengths, pyramid_parts(depth))


def batch_node_means(x: torch.Tensor, lengths: torch.Tensor, depth: int) -> torch.Tensor:
    """Differentiable node means of a padded batch.

    Args:
        x: ``[B, T, d]`` frame features, anything past ``lengths`` is ignored.
        lengths: ``[B]`` number of valid frames per video (>= 1).
        depth: pyramid depth D.

    Returns:
        ``[B, 2^D - 1, d]`` node means, level by level, left to right.
    """
    if x.dim() != 3:
        raise ValueError(f"expected x of shape [B, T, d], got {tuple(x.shape)}")
    b, _, d = x.shape
    starts, ends = batch_node_bounds(lengths.to(x.device), depth)  # [B, M]
    # Prefix sums over time with a leading zero row; padding is never inside any [s, e).
    csum = torch.cat([x.new_zeros(b, 1, d), torch.cumsum(x, dim=1)], dim=1)  # [B, T+1, d]
    hi = torch.gather(csum, 1, ends[..., None].expand(-1, -1, d))  # [B, M, d]
    lo = torch.gather(csum, 1, starts[..., None].expand(-1, -1, d))  # [B, M, d]
    counts = (ends - starts).to(x.dtype)[..., None]  # [B, M, 1]
    return (hi - lo) / counts


def batch_node_maxes(x: torch.Tensor, lengths: torch.Tensor, depth: int) -> torch.Tensor:
    """``[B, 2^D - 1, d]`` node maxima of a padded batch ``x [B, T, d]`` (padding ignored)."""
    if x.dim() != 3:
        raise ValueError(f"expected x of shape [B, T, d], got {tuple(x.shape)}")
    t = x.shape[1]
    starts, ends = batch_node_bounds(lengths.to(x.device), depth)  # [B, M]
    frame = torch.arange(t, device=x.device)
    out = []
    for m in range(starts.shape[1]):  # one node at a time keeps memory at O(B T d)
        inside = (frame[None, :] >= starts[:, m, None]) & (frame[None, :] < ends[:, m, None])
        out.append(x.masked_fill(~inside[..., None], float("-inf")).amax(dim=1))  # [B, d]
    return torch.stack(out, dim=1)  # [B, M, d]
