"""Interval pooling names, kept importable from here: they live in :mod:`aggregator.intervals`."""

from __future__ import annotations

from aggregator.intervals import (
    Intervals,
    PoolKind,
    PyramidLeaves,
    batch_interval_bounds,
    batch_pool_intervals,
    interval_bounds,
    pool_intervals,
    pyramid_mix,
)

__all__ = [
    "Intervals",
    "PoolKind",
    "PyramidLeaves",
    "batch_interval_bounds",
    "batch_pool_intervals",
    "interval_bounds",
    "pool_intervals",
    "pyramid_mix",
]
