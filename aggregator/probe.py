"""Linear-probe references: a standardised logistic regression on the same videos as a head.

Two probes per run, both fitted on the whole training split and scored on the test split:
``global_mean`` (each stream's mean over all frames, concatenated) and ``pyramid_nodes`` (every
node mean of a ``levels``-level temporal pyramid, flattened and concatenated). They say at once
whether a pooling head is worth its cost on these features. Scikit-learn's
``LogisticRegression`` (L2, C = 1, lbfgs) after a ``StandardScaler`` fitted on the training
videos. Where the node features would not fit a memory budget, the pyramid has fewer levels
(recorded in the result).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from aggregator.data import load_summaries
from aggregator.intervals import Intervals
from aggregator.metrics import classification_metrics
from storage import FeatureStore

log = logging.getLogger(__name__)

MAX_FLOATS = 120_000_000  # training-matrix entries of a probe (~0.5 GB as float32)


def _probe_pipeline(seed: int) -> Any:
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    )


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe folded into one affine map of the raw features: ``scores(x) = x W' + b``
    with ``W' [F, L]`` and ``b [L]`` over ``classes`` (indices into the class names); ``L = 1``
    for two classes (the score of ``classes[1]``), else one column per class."""

    classes: np.ndarray
    coef: np.ndarray  # [L, F] on the raw (unscaled) features
    intercept: np.ndarray  # [L]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """``[n, L]`` decision values of ``x [n, F]``."""
        return np.asarray(x, dtype=np.float64) @ self.coef.T + self.intercept

    def logits(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """``(W [n_classes, F], b [n_classes])`` whose softmax is the probe's probabilities: two
        classes get ``-s/2`` and ``+s/2``; classes the probe never saw a bias far below the
        others."""
        f = self.coef.shape[1]
        weight, bias = np.zeros((n_classes, f)), np.zeros(n_classes)
        if len(self.coef) == 1:
            half_w, half_b = self.coef[0] / 2, self.intercept[0] / 2
            weight[self.classes[0]], bias[self.classes[0]] = -half_w, -half_b
            weight[self.classes[1]], bias[self.classes[1]] = half_w, half_b
        else:
            weight[self.classes], bias[self.classes] = self.coef, self.intercept
        unseen = np.setdiff1d(np.arange(n_classes), self.classes)
        if len(unseen):
            bias[unseen] = bias[self.classes].min() - UNSEEN_MARGIN
        return weight, bias


UNSEEN_MARGIN = 10.0  # nats below the lowest seen class's bias for a class without training video


def fit_linear_probe(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> LinearProbe:
    """The probe of this module (standardised L2 logistic regression, C = 1) fitted on ``x [n, F]``
    with labels ``y`` (at least two classes), the scaler folded into the weights."""
    if len(np.unique(y)) < 2:
        raise ValueError("a probe needs training videos of at least two classes")
    model = _probe_pipeline(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(np.asarray(x, dtype=np.float32), y)
    scaler, lr = model[0], model[-1]
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    coef = np.asarray(lr.coef_, dtype=np.float64) / scale
    intercept = np.asarray(lr.intercept_, dtype=np.float64) - coef @ np.asarray(
        scaler.mean_, dtype=np.float64
    )
    return LinearProbe(np.asarray(lr.classes_, dtype=np.int64), coef, intercept)


def probe_accuracy(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the standardised logistic regression on ``x_train [n, F]``; metrics on the test."""
    model = _probe_pipeline(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(np.asarray(x_train, dtype=np.float32), y_train)
    proba = np.zeros((len(x_test), len(class_names)))
    proba[:, model.classes_] = model.predict_proba(np.asarray(x_test, dtype=np.float32))
    m = classification_metrics(proba, y_test, list(class_names))
    return {k: m[k] for k in ("top1", "top5", "mean_class_accuracy")} | {
        "features": int(x_train.shape[1])
    }


def linear_probes(
    store: FeatureStore,
    streams: Sequence[str],
    train_ids: Sequence[str],
    y_train: np.ndarray,
    test_ids: Sequence[str],
    y_test: np.ndarray,
    class_names: Sequence[str],
    *,
    levels: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``global_mean`` and ``pyramid_nodes`` probes of ``streams`` (see the module)."""
    t0 = time.perf_counter()
    if len(np.unique(y_train)) < 2:
        raise ValueError("a probe needs training videos of at least two classes")
    dims = {s: int(store.read(train_ids[0], s).shape[1]) for s in streams}
    width = sum(dims.values())
    depth = levels
    while depth > 1 and len(train_ids) * ((1 << depth) - 1) * width > MAX_FLOATS:
        depth -= 1
    if depth < levels:
        log.info("node probe on %d levels (of %d) to stay within its memory budget", depth, levels)
    spec = Intervals.pyramid(depth)

    def nodes(ids: Sequence[str]) -> Mapping[str, np.ndarray]:
        return {s: load_summaries(store, ids, s, spec, progress=False) for s in streams}

    train_nodes, test_nodes = nodes(train_ids), nodes(test_ids)

    def flat(n: Mapping[str, np.ndarray], count: int) -> np.ndarray:
        return np.concatenate([n[s][:, :count].reshape(len(n[s]), -1) for s in streams], axis=1)

    out: dict[str, Any] = {}
    for name, count in (("global_mean", 1), ("pyramid_nodes", (1 << depth) - 1)):
        out[name] = probe_accuracy(
            flat(train_nodes, count),
            y_train,
            flat(test_nodes, count),
            y_test,
            class_names,
            seed=seed,
        )
    out["pyramid_nodes"]["levels"] = depth
    out["n_train"] = len(train_ids)
    out["seconds"] = time.perf_counter() - t0
    return out
