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

from aggregator.intervals import node_level_index


def text_colour(rgba: Sequence[float] | np.ndarray) -> str:
    """Black or white, whichever contrasts more with a cell of colour ``rgba`` (WCAG relative
    luminance of the sRGB colour)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # contrast with black (L + 0.05) / 0.05 vs with white 1.05 / (L + 0.05)
    return "black" if (luminance + 0.05) ** 2 > 0.05 * 1.05 else "white"


def _titled(fig: Figure, what: str, title: str) -> None:
    fig.suptitle(f"{title}: {what}" if title else what, fontsize=10)


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


def plot_beta_pyramid(beta: Mapping[str, np.ndarray], path: str | Path, *, title: str = "") -> Path:
    """Heatmap of beta per stream (rows) and pyramid (columns), levels top to bottom.

    ``beta[stream]`` is ``[P, 2^D - 1]`` (one row per pyramid) or ``[2^D - 1]``. Warmer is heavier,
    as in the multiple aggregation paper, Fig. 5. Every panel shares one colour scale (0 to the
    largest weight of any stream), so colours compare across streams; ``title`` (the run and
    head) heads the figure.
    """
    mats = {s: np.atleast_2d(np.asarray(b, dtype=np.float64)) for s, b in beta.items()}
    if not mats:
        raise ValueError("no beta to plot")
    n_rows = len(mats)
    n_cols = max(m.shape[0] for m in mats.values())
    fig = Figure(figsize=(3.2 * n_cols + 1.0, 2.4 * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    vmax = max(float(m.max()) for m in mats.values()) or 1.0
    im = None
    for r, (stream, mat) in enumerate(mats.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= mat.shape[0]:
                ax.axis("off")
                continue
            grid = pyramid_grid(mat[c])
            im = ax.imshow(grid, aspect="auto", cmap="turbo", vmin=0.0, vmax=vmax)
            ax.set_yticks(range(grid.shape[0]), [f"l={i + 1}" for i in range(grid.shape[0])])
            ax.set_xticks([])
            panel = stream if mat.shape[0] == 1 else f"{stream}, pyramid {c + 1}"
            ax.set_title(panel, fontsize=9)
            if grid.shape[0] <= 4:  # few nodes: print the weights
                for n, b in enumerate(mat[c]):
                    level, k = node_level_index(n)
                    span = grid.shape[1] >> (level - 1)
                    x = (k - 1) * span + span / 2 - 0.5
                    colour = text_colour(im.cmap(im.norm(b)))
                    ax.text(
                        x,
                        level - 1,
                        f"{b:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
    assert im is not None
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="beta (one scale)")
    _titled(fig, "learned node weights (time left to right)", title)
    return _save(fig, path)


def plot_history(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    refit: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Loss (left) and top-1 (right) against optimiser steps: training beside validation in
    each panel, and the refit on the whole training split (no validation) dashed when given.

    Entries carry ``step`` (or ``epoch``), ``train_loss``, ``train_top1`` and optionally
    ``val_loss``, ``val_top1``.
    """
    if not history:
        raise ValueError("empty training history")
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    runs: list[tuple[Sequence[Mapping[str, Any]], str, str]] = [(history, "", "-")]
    if refit:
        runs.append((refit, " (refit on train + val)", "--"))
    x_label = "step" if "step" in history[0] else "epoch"
    for rows, suffix, style in runs:
        xs = [h.get(x_label, i + 1) for i, h in enumerate(rows)]
        for ax, keys in (
            (ax_loss, (("train_loss", "train"), ("val_loss", "validation"))),
            (ax_acc, (("train_top1", "train"), ("val_top1", "validation"))),
        ):
            for key, label in keys:
                vals = [h.get(key) for h in rows]
                if any(v is not None for v in vals):
                    ax.plot(
                        xs,
                        [np.nan if v is None else v for v in vals],
                        style,
                        color="tab:blue" if key.startswith("train") else "tab:orange",
                        label=label + suffix,
                    )
    ax_loss.set(xlabel=x_label, ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel=x_label, ylabel="top-1", title="accuracy", ylim=(0, 1.02))
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    _titled(fig, "training curves", title)
    return _save(fig, path)


def plot_confusion(
    confusion: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Row-normalised confusion matrix (true class rows, predicted class columns); counts are
    printed in black or white, whichever reads on the cell's colour."""
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
                    colour = text_colour(im.cmap(im.norm(norm[i, j])))
                    ax.text(
                        j,
                        i,
                        str(int(cm[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
    ax.set(xlabel="predicted", ylabel="true")
    _titled(fig, "confusion (row-normalised)", title)
    fig.colorbar(im, ax=ax, shrink=0.7)
    return _save(fig, path)


def plot_datp_weights(
    times: np.ndarray,
    weights: Mapping[str, np.ndarray],
    video_ids: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
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
    _titled(fig, "DATP temporal weights", title)
    return _save(fig, path)
