"""PNG figures of a run: learned pyramid weights, training curves, confusion matrix, DATP weights.

Drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot, no global backend state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aggregator.nodes import node_level_index


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def pyramid_grid(beta: np.ndarray) -> np.ndarray:
    """``[D, 2^(D-1)]`` image of node weights ``[2^D - 1]``: each node spans its time interval."""
    beta = np.asarray(beta, dtype=np.float64).ravel()
    depth = (beta.size + 1).bit_length() - 1
    if (1 << depth) - 1 != beta.size:
        raise ValueError(f"{beta.size} node weights do not form a full pyramid (2^D - 1)")
    width = 1 << (depth - 1)
    grid = np.empty((depth, width))
    for n, b in enumerate(beta):
        level, k = node_level_index(n)
        span = width >> (level - 1)
        grid[level - 1, (k - 1) * span : k * span] = b
    return grid


def plot_beta_pyramid(beta: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Heatmap of beta per stream (rows) and pyramid (columns), levels top to bottom.

    ``beta[stream]`` is ``[P, 2^D - 1]`` (one row per pyramid) or ``[2^D - 1]``. Warmer is heavier,
    as in seed 002, Fig. 5.
    """
    mats = {s: np.atleast_2d(np.asarray(b, dtype=np.float64)) for s, b in beta.items()}
    if not mats:
        raise ValueError("no beta to plot")
    n_rows = len(mats)
    n_cols = max(m.shape[0] for m in mats.values())
    fig = Figure(figsize=(3.2 * n_cols + 1.0, 2.4 * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (stream, mat) in enumerate(mats.items()):
        vmax = float(mat.max())
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= mat.shape[0]:
                ax.axis("off")
                continue
            grid = pyramid_grid(mat[c])
            im = ax.imshow(grid, aspect="auto", cmap="turbo", vmin=0.0, vmax=vmax)
            ax.set_yticks(range(grid.shape[0]), [f"l={i + 1}" for i in range(grid.shape[0])])
            ax.set_xticks([])
            title = stream if mat.shape[0] == 1 else f"{stream}, pyramid {c + 1}"
            ax.set_title(title, fontsize=9)
            if grid.shape[0] <= 4:  # few nodes: print the weights
                for n, b in enumerate(mat[c]):
                    level, k = node_level_index(n)
                    span = grid.shape[1] >> (level - 1)
                    x = (k - 1) * span + span / 2 - 0.5
                    ax.text(x, level - 1, f"{b:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=list(axes[r]), shrink=0.8, label="beta")
    fig.suptitle("learned node weights (time left to right)", fontsize=10)
    return _save(fig, path)


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training and validation loss and accuracy per epoch."""
    if not history:
        raise ValueError("empty training history")
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax_loss.plot(epochs, [np.nan if v is None else v for v in vals], label=label)
    for key, label in (("train_top1", "train"), ("val_top1", "validation")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax_acc.plot(epochs, [np.nan if v is None else v for v in vals], label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1", title="accuracy", ylim=(0, 1.02))
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(
    confusion: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path
) -> Path:
    """Row-normalised confusion matrix (true class rows, predicted class columns)."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    size = min(3.0 + 0.22 * n, 24.0)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 40:
        ax.set_xticks(range(n), list(class_names), rotation=90, fontsize=7)
        ax.set_yticks(range(n), list(class_names), fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (row-normalised)")
    fig.colorbar(im, ax=ax, shrink=0.7)
    return _save(fig, path)


def plot_datp_weights(
    times: np.ndarray,
    weights: Mapping[str, np.ndarray],
    video_ids: Sequence[str],
    path: str | Path,
) -> Path:
    """DATP temporal weights ``w / ||w||_2`` over segment time for a few videos, per stream."""
    if not weights:
        raise ValueError("no DATP weights to plot")
    fig = Figure(figsize=(5.0 * len(weights), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(weights)))
    for ax, (stream, w) in zip(axes, weights.items(), strict=True):
        w = np.asarray(w, dtype=np.float64)
        w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        for row, vid in zip(w, video_ids, strict=False):
            ax.plot(times, row, marker="o", ms=3, label=vid)
        ax.set(xlabel="segment time t", ylabel="w / ||w||", title=f"DATP weights ({stream})")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=6)
    return _save(fig, path)
