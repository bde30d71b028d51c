"""The SVM's choice of pyramid depth, ``C`` and gamma factor on validation folds.

:func:`selection_folds` gives the folds (the validation part, pooled with further folds until
:data:`MIN_VALIDATION` videos validate, at most :data:`MAX_FOLDS`); :func:`select_values` fits
the grid on every fold's fit videos (a stratified subsample of at most about
:data:`SELECTION_MAX_VIDEOS` of them, :func:`selection_rows`), standardised with their own
statistics, scores it on the fold's validation videos and picks the best pooled top-1 (ties:
fewer levels, then the smaller ``C``, then the gamma factor nearest 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.intervals import n_nodes
from aggregator.rundir import LabelledSplits, further_folds
from aggregator.svm.estimator import MultipleAggregationSVM
from aggregator.svm.fitted import bound_record, export_state, node_statistics
from aggregator.svm.predictor import class_scores, standardize, stream_decision
from aggregator.svm.solvers import NodeGrams

SELECTION_MAX_VIDEOS = 2000  # the selection grid is fitted on at most about this many videos
MIN_VALIDATION = 100  # validation videos the selection pools before it stops adding folds
MAX_FOLDS = 10


@dataclass(frozen=True)
class Selection:
    """What :func:`select_values` found: the grid's ``record`` (pooled and per-fold top-1 of
    every point), the ``index`` of the chosen point, its class scores on the pooled validation
    videos (folds in order; None without folds) and the most videos a fold's grid was fitted on.
    """

    record: list[dict[str, Any]]
    index: int
    val_scores: np.ndarray | None
    videos: int

    @property
    def levels(self) -> int:
        """The chosen pyramid depth."""
        return int(self.record[self.index]["levels"])

    @property
    def values(self) -> dict[str, float]:
        """The chosen estimator values: ``C``, and the gamma factor where the kernel has one."""
        point = self.record[self.index]
        return {k: point[k] for k in ("C", "gamma_scale") if k in point}

    @property
    def val_top1(self) -> float:
        """The chosen point's pooled validation top-1 (NaN without folds)."""
        return float(self.record[self.index]["val_top1"])


def selection_folds(splits: LabelledSplits) -> list[np.ndarray]:
    """The SVM's validation folds (positions into the training split): the validation part and,
    while fewer than :data:`MIN_VALIDATION` videos are pooled, further folds of whole groups or
    of the same size per class (:func:`aggregator.rundir.further_folds`), at most
    :data:`MAX_FOLDS` in all."""
    if not len(splits.val_idx):
        return []
    more = further_folds(
        splits.y_train,
        splits.fit_idx,
        splits.val_idx,
        list(splits.more_folds) if splits.group_by is not None else None,
        min_validation=MIN_VALIDATION,
        max_folds=MAX_FOLDS,
        seed=splits.seed,
    )
    return [np.sort(v) for v in (splits.val_idx, *more)]


def selection_rows(y_fit: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of the fit videos the selection grid is fitted on: all of them up to ``limit``,
    else a seeded subsample of about ``limit`` with every class in its share (at least one)."""
    if len(y_fit) <= limit:
        return np.arange(len(y_fit))
    from aggregator.splits import stratified_holdout

    _, sub = stratified_holdout(y_fit, limit / len(y_fit), seed)
    return sub


def _fit_grid(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_val: np.ndarray | None,
    params: Mapping[str, Any],
    c_grid: Sequence[float],
    gammas: Sequence[float],
    classes: np.ndarray,
    n_classes: int,
) -> list[tuple[dict[str, float], dict[str, Any], np.ndarray | None]]:
    """Fit one stream's SVM for every ``C`` of ``c_grid`` and every gamma factor of ``gammas``
    on the fit videos ``X_fit`` (standardised node means of one depth) and score each on the
    validation videos; the fits of one gamma share one Gram cache across ``C``. Per grid point:
    its values, its fit record and its ``[n_val, n_classes]`` validation class scores."""
    kernel = params["kernel"]
    out: list[tuple[dict[str, float], dict[str, Any], np.ndarray | None]] = []
    for g in gammas:
        grams = None
        if params["variant"] == "concat" and len(c_grid) > 1:
            node_gammas = None
            if kernel != "linear":
                node_gammas = MultipleAggregationSVM(**{**params, "gamma_scale": g}).node_gammas(
                    X_fit
                )
            grams = NodeGrams(
                X_fit,
                kernel=kernel,
                gammas=node_gammas,
                budget_bytes=params["gram_cache_gib"] * 2**30,
            )
        for C in sorted(c_grid):
            t0 = time.perf_counter()
            values = {"C": float(C)} | ({"gamma_scale": g} if kernel != "linear" else {})
            est = MultipleAggregationSVM(**{**params, **values}).fit(X_fit, y_fit, grams=grams)
            scores = None
            if X_val is not None and len(X_val):
                decision = stream_decision(export_state(est), X_val)
                scores = class_scores(decision, classes, n_classes)
            entry: dict[str, Any] = {"n_iter": est.n_iter_, **bound_record(est)}
            if est.gammas_ is not None:
                entry["gamma_mean"] = float(np.mean(est.gammas_))
            entry["seconds"] = time.perf_counter() - t0
            out.append((values, entry, scores))
    return out


def _choose(record: Sequence[Mapping[str, Any]]) -> int:
    """The grid point with the best pooled validation top-1; ties to the fewest levels, then the
    smaller ``C``, then the gamma factor nearest 1."""

    def key(i: int) -> tuple[float, ...]:
        r = record[i]
        top1 = r["val_top1"]
        return (
            -math.inf if math.isnan(top1) else top1,
            -r["levels"],
            -r["C"],
            -abs(math.log(r.get("gamma_scale", 1.0))),
        )

    return max(range(len(record)), key=key)


def _pool_record(record: list[dict[str, Any]], sizes: Sequence[int]) -> None:
    """Turn every grid point's per-fold counts of right answers into its pooled and per-fold
    validation top-1 (NaN and none without folds), with fold 0's iterations and bound and the
    stopped solves and seconds of all folds."""
    for r in record:
        correct = r.pop("fold_correct")
        r["val_top1"] = sum(correct) / sum(sizes) if sizes else math.nan
        r["fold_val_top1"] = [c / n for c, n in zip(correct, sizes, strict=True)] if sizes else []
        first = r["folds"][0]
        r |= {key: first[key] for key in ("n_iter", "gamma_mean", "svm_iter_bound") if key in first}
        for key in ("svm_at_bound", "svm_solves", "seconds"):
            r[key] = sum(f[key] for f in r["folds"])


def select_values(
    X_train: np.ndarray,
    splits: LabelledSplits,
    folds: Sequence[np.ndarray],
    depths: Sequence[int],
    params: Mapping[str, Any],
    c_grid: Sequence[float],
    gammas: Sequence[float],
    use_stats: bool,
    seed: int,
) -> Selection:
    """Fit the grid (pyramid depth x ``C`` x gamma factor) on every fold's fit videos (a
    stratified subsample of at most about :data:`SELECTION_MAX_VIDEOS` of them), standardised
    with their own statistics, and score it on the fold's validation videos."""
    n_classes = len(splits.class_names)
    n_train = len(splits.train_ids)
    record: list[dict[str, Any]] = []
    pooled: list[list[np.ndarray]] = []
    fitted = 0
    for k, val in enumerate(folds or [np.zeros(0, dtype=np.int64)]):
        fit = np.setdiff1d(np.arange(n_train), val)  # fold 0: splits.fit_idx, built the same way
        y_fit = splits.y_train[fit]
        fit = fit[selection_rows(y_fit, SELECTION_MAX_VIDEOS, seed)]
        fitted = max(fitted, len(fit))
        i = 0
        for levels in depths:
            m = n_nodes(levels)
            X_fit = np.asarray(X_train[fit, :m])
            mean, std = node_statistics(X_fit) if use_stats else (None, None)
            X_fit = standardize(X_fit, mean, std)
            X_val = standardize(X_train[val, :m], mean, std) if len(val) else None
            grid = _fit_grid(
                X_fit,
                splits.y_train[fit],
                X_val,
                params,
                c_grid,
                gammas,
                np.unique(splits.y_train[fit]),
                n_classes,
            )
            y_val = splits.y_train[val]
            for values, entry, scores in grid:
                correct = 0 if scores is None else int((scores.argmax(1) == y_val).sum())
                if k == 0:
                    record.append({"levels": levels, **values, "fold_correct": [], "folds": []})
                    pooled.append([])
                record[i]["fold_correct"].append(correct)
                record[i]["folds"].append(entry)
                if scores is not None:
                    pooled[i].append(scores)
                i += 1
    _pool_record(record, [len(v) for v in folds])
    chosen = _choose(record)
    scores = np.concatenate(pooled[chosen]) if folds else None
    return Selection(record, chosen, scores, fitted)
