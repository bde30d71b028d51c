"""Classification metrics written to every run's ``metrics.json``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest scores.

    Ties are broken as ``argmax`` breaks them (the lower class index first), so top-1 agrees with
    the confusion matrix, and a model that scores every class alike is not counted right.
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y)
    if scores.ndim != 2 or scores.shape[0] != y.shape[0]:
        raise ValueError(f"scores {scores.shape} and labels {y.shape} do not match")
    if scores.shape[0] == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    true = scores[np.arange(len(y)), y]
    # rank = classes scoring higher than the true one, or as high with a lower index
    higher = scores > true[:, None]
    tied_before = (scores == true[:, None]) & (np.arange(scores.shape[1])[None, :] < y[:, None])
    rank = (higher | tied_before).sum(axis=1)
    return float((rank < k).mean())


def classification_metrics(
    scores: np.ndarray, y: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """top1, top5, mean_class_accuracy, per_class_accuracy and the confusion matrix.

    ``scores`` is ``[n, C]`` (logits or probabilities), ``y`` the ``[n]`` true class indices.
    Accuracies are fractions in [0, 1]; a class without test videos has accuracy ``None`` and does
    not count towards the mean.
    """
    scores = np.asarray(scores)
    y = np.asarray(y, dtype=np.int64)
    n_classes = len(class_names)
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        raise ValueError(f"scores must be [n, {n_classes}], got {scores.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    pred = scores.argmax(axis=1) if scores.size else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(class_names):
        total = confusion[c].sum()
        per_class[name] = float(confusion[c, c] / total) if total else None
    present = [v for v in per_class.values() if v is not None]
    return {
        "top1": topk_accuracy(scores, y, 1) if len(y) else None,
        "top5": topk_accuracy(scores, y, 5) if len(y) else None,
        "mean_class_accuracy": float(np.mean(present)) if present else None,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "n_test": len(y),
    }


def beta_by_level(beta: np.ndarray) -> list[list[float]]:
    """Split ``[2^D - 1]`` node weights into levels: ``[[b_1], [b_2, b_3], ...]``."""
    beta = np.asarray(beta, dtype=np.float64).ravel()
    depth = (beta.size + 1).bit_length() - 1
    if (1 << depth) - 1 != beta.size:
        raise ValueError(f"{beta.size} node weights do not form a full pyramid (2^D - 1)")
    out = []
    for level in range(1, depth + 1):
        start = (1 << (level - 1)) - 1
        out.append([float(v) for v in beta[start : start + (1 << (level - 1))]])
    return out


def chance_warnings(metrics: Mapping[str, Any], n_classes: int) -> list[str]:
    """A warning when the test top-1 is at or below chance (one over the classes)."""
    top1, n_test = metrics.get("top1"), metrics.get("n_test") or 0
    if top1 is None or not n_test or n_classes < 2 or top1 > 1.0 / n_classes + 1e-12:
        return []
    return [
        f"test top-1 {100 * top1:.1f}% is at or below chance ({100 / n_classes:.1f}%, "
        f"{n_classes} classes): this head learned nothing that transfers to the test videos"
    ]
