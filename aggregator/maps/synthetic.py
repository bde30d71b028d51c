"""A synthetic task that only spatial maps can solve: the class is where in the frame motion is.

Every video shows the same kind of scene: a fixed layout of cell appearances (one random pattern
per quadrant of the ``grid x grid`` map plus a per-cell one), a per-video scene offset, an object
pattern at one cell and noise. The motion map is noise except at the object's cell, which carries
a motion pattern of random strength. The class is the quadrant of that cell. Averaged over the
cells, every video of every class has the same expected appearance and motion vector, so a head on
pooled vectors is at chance; attending to the moving cell and reading its appearance solves it.

The pooled streams (``appearance``, ``motion``: ``[T, C]``) are the spatial means of the maps, as
extraction stores them; the map streams (``[T', grid, grid, C]``) keep every ``map_stride``-th
frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import FeatureStore

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class LocationTask:
    """Sizes and noise of the task; ``frames`` is the range of T (inclusive)."""

    grid: int = 7
    channels: int = 64
    frames: tuple[int, int] = (8, 16)
    noise: float = 0.5
    scene_offset: float = 0.5
    motion: tuple[float, float] = (1.5, 3.0)
    map_stride: int = 1

    def __post_init__(self) -> None:
        if self.grid < 3 or self.grid % 2 == 0:
            raise ValueError(f"grid must be odd and >= 3, got {self.grid}")
        if not 1 <= self.frames[0] <= self.frames[1]:
            raise ValueError(
                f"frames must be a range (lo, hi) with 1 <= lo <= hi, got {self.frames}"
            )
        if self.map_stride < 1:
            raise ValueError(f"map_stride must be >= 1, got {self.map_stride}")


def quadrant_cells(grid: int, k: int) -> list[tuple[int, int]]:
    """The cells of quadrant ``k`` (``QUADRANTS`` order); the middle row and column are in none."""
    half = grid // 2
    rows = range(half) if k in (0, 1) else range(half + 1, grid)
    cols = range(half) if k in (0, 2) else range(half + 1, grid)
    return [(i, j) for i in rows for j in cols]


def _patterns(task: LocationTask, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    c, g = task.channels, task.grid
    half = g // 2
    quadrant = rng.standard_normal((4, c))
    layout = 0.3 * rng.standard_normal((g, g, c))
    for i in range(g):
        for j in range(g):
            if i != half and j != half:
                layout[i, j] += quadrant[(2 if i > half else 0) + (1 if j > half else 0)]
    return {
        "layout": layout,
        "object": rng.standard_normal(c),
        "motion": rng.standard_normal(c),
    }


def location_video(
    task: LocationTask, label: int, rng: np.random.Generator, patterns: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """One video of class ``label``: ``{appearance, motion: [T, C], *_map: [T', g, g, C]}``."""
    g, c = task.grid, task.channels
    t = int(rng.integers(task.frames[0], task.frames[1] + 1))
    cells = quadrant_cells(g, label)
    i, j = cells[int(rng.integers(len(cells)))]
    app = patterns["layout"][None] + task.scene_offset * rng.standard_normal(c)  # [1, g, g, C]
    app = app + task.noise * rng.standard_normal((t, g, g, c))  # [T, g, g, C]
    app[:, i, j] += patterns["object"]
    mot = task.noise * rng.standard_normal((t, g, g, c))
    mot[:, i, j] += rng.uniform(*task.motion) * patterns["motion"]
    keep = slice(None, None, task.map_stride)
    return {
        "appearance": app.mean(axis=(1, 2)),
        "motion": mot.mean(axis=(1, 2)),
        "appearance_map": app[keep],
        "motion_map": mot[keep],
    }


def write_location_store(
    path: str | Path,
    *,
    train_per_class: int = 100,
    test_per_class: int = 50,
    task: LocationTask | None = None,
    seed: int = 0,
) -> FeatureStore:
    """A store of the task (classes named by quadrant, splits ``train`` and ``test``)."""
    task = task or LocationTask()
    store = FeatureStore.create(path, class_names=list(QUADRANTS))
    patterns = _patterns(task, seed)
    rng = np.random.default_rng([seed, 1])
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for k, name in enumerate(QUADRANTS):
            for n in range(per_class):
                streams = location_video(task, k, rng, patterns)
                store.write_video(f"{split}_{name}_{n:04d}", streams, label=name, split=split)
    return store
