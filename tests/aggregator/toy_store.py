"""Tiny synthetic stores for the head and trainer tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from storage import FeatureStore


def write_order_store(
    path: str | Path,
    *,
    n_train: int = 12,
    n_test: int = 6,
    d: int = 8,
    noise: float = 1.0,
    seed: int = 0,
    streams: Sequence[str] = ("appearance",),
) -> FeatureStore:
    """Six classes that differ only in temporal order.

    Every video shows the same three patterns a, b, c, each for exactly a third of its frames
    (T is a multiple of 3), in one of the 3! orders; class = order. The mean over all frames is
    (a + b + c) / 3 + noise for every class, so global average pooling sees no difference at all,
    while any pyramid level >= 2 does. Each extra stream sees the content through its own random
    linear map (a different feature size).
    """
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(3, d))
    maps = {s: rng.normal(size=(d, d + 2 * i)) / np.sqrt(d) for i, s in enumerate(streams)}
    store = FeatureStore.create(path, extractor={s: {"backbone": "toy"} for s in streams})
    for c, order in enumerate(itertools.permutations(range(3))):
        for i in range(n_train + n_test):
            t = 3 * int(rng.integers(4, 17))
            x = noise * rng.normal(size=(t, d)) + 1.0
            for part, p in enumerate(order):
                x[part * t // 3 : (part + 1) * t // 3] += 2.0 * patterns[p]
            store.write_video(
                f"c{c}_v{i:03d}",
                {s: x @ m for s, m in maps.items()},
                label=f"order{c}",
                split="train" if i < n_train else "test",
            )
    return store


def write_burst_store(
    path: str | Path,
    *,
    n_train: int = 12,
    n_test: int = 10,
    d: int = 8,
    seed: int = 0,
    streams: Sequence[str] = ("appearance", "motion"),
) -> FeatureStore:
    """Six classes told apart by content: class c shows pattern c for a sixth of the frames, at a
    random place in the video, over noise. Every pooling (mean, max, any partition) sees it, so a
    head that learns anything at all should beat chance (1/6) clearly."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(6, d))
    maps = {s: rng.normal(size=(d, d + 2 * i)) / np.sqrt(d) for i, s in enumerate(streams)}
    store = FeatureStore.create(path, extractor={s: {"backbone": "toy"} for s in streams})
    for c in range(6):
        for i in range(n_train + n_test):
            t = 6 * int(rng.integers(2, 9))
            x = rng.normal(size=(t, d))
            start = int(rng.integers(0, t - t // 6 + 1))
            x[start : start + t // 6] += 3.0 * patterns[c]
            store.write_video(
                f"c{c}_v{i:03d}",
                {s: x @ m for s, m in maps.items()},
                label=f"burst{c}",
                split="train" if i < n_train else "test",
            )
    return store
