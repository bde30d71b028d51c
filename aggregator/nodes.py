"""Pyramid node names, kept importable from here: they live in :mod:`aggregator.intervals`."""

from __future__ import annotations

from aggregator.intervals import (
    batch_interval_bounds,
    interval_bounds,
    n_nodes,
    node_bounds,
    node_level_index,
    node_maxes,
    node_means,
    pyramid_parts,
)

__all__ = [
    "batch_interval_bounds",
    "interval_bounds",
    "n_nodes",
    "node_bounds",
    "node_level_index",
    "node_maxes",
    "node_means",
    "pyramid_parts",
]
