"""How an SVM run fuses its streams: stream weights on the simplex chosen by validation top-1
(:func:`choose_fusion`) and a softmax temperature by minimum negative log-likelihood
(:func:`fit_temperature`), both learned on the pooled validation folds' scores of the chosen
values (:func:`calibrate`). See :mod:`aggregator.svm.run` for why."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from aggregator.svm.fitted import StreamFit
from aggregator.svm.predictor import fused_scores

log = logging.getLogger(__name__)

FUSION_GRID = 20  # simplex step 1/20 for the stream weights


@dataclass(frozen=True)
class Fusion:
    """Stream weights and softmax temperature, and where they were learned."""

    weights: dict[str, float]
    val_top1: float | None
    temperature: float
    calibration: str


def _weight_grid(n_streams: int, steps: int) -> list[tuple[float, ...]]:
    if n_streams == 1:
        return [(1.0,)]

    def compositions(total: int, parts: int) -> list[tuple[int, ...]]:
        if parts == 1:
            return [(total,)]
        return [(i, *rest) for i in range(total + 1) for rest in compositions(total - i, parts - 1)]

    step = steps if n_streams == 2 else max(2, steps // 2)
    return [tuple(k / step for k in c) for c in compositions(step, n_streams)]


def choose_fusion(
    stream_scores: Mapping[str, np.ndarray], y: np.ndarray
) -> tuple[dict[str, float], float]:
    """Stream weights on the simplex with the best top-1 on ``y`` (ties: most even); its top-1."""
    streams = list(stream_scores)
    even = np.full(len(streams), 1.0 / len(streams))
    best: tuple[float, float, tuple[float, ...]] | None = None
    for w in _weight_grid(len(streams), FUSION_GRID):
        fused = fused_scores(stream_scores, dict(zip(streams, w, strict=True)))
        acc = float((fused.argmax(axis=1) == y).mean())
        key = (acc, -float(np.abs(np.array(w) - even).sum()))
        if best is None or key > best[:2]:
            best = (*key, w)
    assert best is not None
    return dict(zip(streams, best[2], strict=True)), best[0]


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """Softmax temperature ``T`` minimising the mean negative log-likelihood of ``y``."""

    def nll(log_t: float) -> float:
        logp = log_softmax(scores / math.exp(log_t), axis=1)
        return float(-logp[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=(-7.0, 7.0), method="bounded")
    return float(math.exp(res.x))


def calibrate(fits: Mapping[str, StreamFit], y_val: np.ndarray) -> Fusion:
    """Fusion weights and temperature learned on the pooled validation folds' scores of the
    chosen values (equal weights and temperature 1 without a validation video)."""
    val_scores = {s: f.val_scores for s, f in fits.items() if f.val_scores is not None}
    if len(y_val):
        weights, val_top1 = choose_fusion(val_scores, y_val)
        temperature = fit_temperature(fused_scores(val_scores, weights), y_val)
        return Fusion(weights, val_top1, temperature, "validation")
    log.warning("no validation video: equal stream weights and temperature 1")
    weights = {s: 1.0 / len(fits) for s in fits}
    return Fusion(weights, None, 1.0, "none (no validation video)")
