"""The node-mean probe beside the SVM: the linear-probe references every run reports
(:func:`reference_probes`), the probe checked against the chosen SVM on the same validation
folds (:func:`probe_on_folds`), and the probe kept as a stream's model when it validates at
least as well (:func:`probe_fit`: a linear multiple-aggregation state with beta uniform)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aggregator.node_cache import NodeCache
from aggregator.rundir import LabelledSplits
from aggregator.svm.fitted import StreamFit, cached_node_means
from aggregator.svm.predictor import class_scores, stream_decision
from storage import FeatureStore

log = logging.getLogger(__name__)


def reference_probes(
    store: FeatureStore, streams: list[str], splits: LabelledSplits, levels: int, seed: int
) -> dict[str, Any] | None:
    """The linear-probe references every run reports (None without test videos)."""
    if not splits.test_ids:
        return None
    from aggregator.probe import linear_probes

    return linear_probes(
        store,
        streams,
        splits.train_ids,
        splits.y_train,
        splits.test_ids,
        splits.y_test,
        splits.class_names,
        levels=levels,
        seed=seed,
    )


def probe_on_folds(
    X: np.ndarray,
    splits: LabelledSplits,
    folds: Sequence[np.ndarray],
    svm_top1: float,
    seed: int,
) -> dict[str, Any] | None:
    """The node-mean probe (standardised logistic regression on the node means ``X [n, M, d]``
    of the training videos) fitted on every fold's fit videos and scored on its validation
    videos, against the chosen SVM's pooled top-1 ``svm_top1``: the probe is kept when it
    validates at least as well (its model is the SVM's with beta uniform and the classifier
    of a logistic regression). Its pooled class scores are kept for the calibration."""
    from aggregator.probe import fit_linear_probe

    n_train = len(splits.train_ids)
    flat = np.asarray(X, dtype=np.float32).reshape(n_train, -1)
    right, scores = 0, []
    for val in folds:
        fit = np.setdiff1d(np.arange(n_train), val)
        if len(np.unique(splits.y_train[fit])) < 2:
            return None
        probe = fit_linear_probe(flat[fit], splits.y_train[fit], seed=seed)
        w, b = probe.logits(len(splits.class_names))
        z = flat[val].astype(np.float64) @ w.T + b
        right += int((z.argmax(1) == splits.y_train[val]).sum())
        scores.append(z)
    videos = sum(len(v) for v in folds)
    top1 = right / videos
    kept = "probe" if top1 >= svm_top1 else "svm"
    log.info(
        "svm: node-mean probe %.4f against the svm %.4f on %d validation videos: keeping the %s",
        top1,
        svm_top1,
        videos,
        kept,
    )
    return {
        "probe": "pyramid_nodes",
        "levels": int(X.shape[1]).bit_length(),
        "val_top1": top1,
        "videos": videos,
        "svm_val_top1": svm_top1,
        "kept": kept,
        "val_scores": np.concatenate(scores),
    }


def probe_fit(
    cache: NodeCache,
    stream: str,
    splits: LabelledSplits,
    X: np.ndarray,
    rows: np.ndarray,
    check: dict[str, Any],
    in_features: int,
    t_cache: float,
    t_fit: float,
) -> StreamFit:
    """The node-mean probe kept as the stream's model: fitted on the training videos ``rows``
    (node means ``X [n, M, d]``), exported as a linear multiple-aggregation state with beta
    uniform over the ``M`` nodes and the scaler folded into the weights."""
    from aggregator.probe import fit_linear_probe

    n, m, d = X.shape
    probe = fit_linear_probe(X.reshape(n, -1), splits.y_train[rows], seed=0)
    if not np.array_equal(probe.classes, splits.classes):
        raise AssertionError("the probe's classes differ from the training split's")
    state: dict[str, Any] = {
        "beta": torch.full((m,), 1.0 / m, dtype=torch.float64),
        "nodes": torch.arange(m, dtype=torch.int64),
        "intercept": torch.from_numpy(probe.intercept.copy()),
        "kernel": "linear",
        "variant": "concat",
        "coef": torch.from_numpy(probe.coef.reshape(len(probe.coef), m, d).astype(np.float32)),
    }
    test_scores = None
    if splits.test_ids:
        nodes = cached_node_means(cache, splits.test_ids, check["levels"])
        decision = stream_decision(state, nodes)
        test_scores = class_scores(decision, splits.classes, len(splits.class_names))
    val_scores = check.pop("val_scores")
    info = {
        "kept": "probe",
        "probe_check": check,
        "levels": check["levels"],
        "C": None,
        "gamma_scale": None,
        "C_grid": [],
        "selection_videos": len(rows),
        "refit": len(rows) == len(splits.train_ids),
        "active_nodes": m,
        "seconds_node_cache": t_fit - t_cache,
        "seconds_fit": time.perf_counter() - t_fit,
        "history": [],
    }
    log.info("svm %s: the node-mean probe (%d levels) validated better: kept", stream, m)
    return StreamFit(state, info, in_features, val_scores, test_scores)
