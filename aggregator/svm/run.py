"""Train the shallow multiple-aggregation SVM on a store, write a run directory, load it back.

``framepool train --head svm`` calls :func:`train_svm`: one :class:`MultipleAggregationSVM` per
stream (one beta per stream) on the pyramid node means of the store's node cache, the streams'
scores fused with weights, and a run directory like the deep heads' (``config.json``,
``model.pt``, ``metrics.json``, PNGs). :class:`SVMPredictor` loads it as an
:class:`aggregator.predictor.Predictor`.

Fusion weights and probabilities are *learned on validation videos*: a stratified 10% of every
class of the training split (:func:`aggregator.data.stratified_holdout`, seeded; whole groups when
the videos have them) is held out and the SVMs are fitted on the rest, with more folds on small
data (below). On the held-out videos a grid over the simplex of stream weights
(step 1/20) picks the best top-1 (ties: the most even weights), then a softmax temperature is fitted
by minimum negative log-likelihood. Learned rather than fixed, because two streams' SVM scores have
no reason to be equally reliable (the multiple aggregation paper learns w_a, w_m and finds them
unequal) and SVM scores need a scale before a softmax; on held-out videos, because training
videos' scores sit at the margins the SVMs were fitted to. The test split is never looked at.
Without any validation video (every class has a single training video) the weights are equal, the
temperature is 1, and ``metrics.json`` says so.

The pyramid depth (when ``levels`` is None, among 1 to :data:`MAX_LEVELS`) and the soft-margin
``C`` (when not given, from :data:`C_GRID`) are chosen together, per stream, by validation top-1
(ties: fewer levels, then the smaller ``C``). A small validation part is pooled with further
folds until :data:`MIN_VALIDATION` videos validate (at most :data:`MAX_FOLDS` folds): the next
folds of whole groups when validation holds out groups, else folds with the validation part's
count of every class (:func:`aggregator.rundir.further_folds`); every fold is standardised with
statistics of its own fit videos. A single held-out group of a dozen videos is too few to
choose a depth; pooled folds are not, and an SVM on a few hundred videos fits in seconds (the
measured effect is in ``benchmarks/README.md``). The fits across ``C`` of one fold and depth
share one :class:`aggregator.svm.solvers.NodeGrams`, so the node Gram matrices are computed
once. The chosen values are then refit on the whole training split; the fusion weights and
temperature are learned on the chosen values' scores of the pooled validation videos. With more
than :data:`SELECTION_MAX_VIDEOS` fit videos a fold's grid is fitted on a seeded, stratified
subsample of about that many, scored on the whole validation part (libsvm's cost grows faster
than n^2 on a hard problem), and the chosen values are always refit on all of them. libsvm's
iterations per SVM are bounded (``MultipleAggregationSVM(svm_max_iter="auto")``); the solves
that stopped at the bound are counted per grid value and for the final fit in ``metrics.json``
and logged.

Node means are standardised per feature with statistics of the training videos (not for the
chi2 kernel, which needs non-negative features); the statistics are part of ``model.pt`` and
applied by :class:`SVMPredictor`. Like the deep heads, every run reports the linear-probe
references.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.base import clone

from aggregator import plots
from aggregator.data import open_store
from aggregator.intervals import n_nodes, node_means
from aggregator.metrics import beta_by_level, chance_warnings, classification_metrics
from aggregator.node_cache import CACHE_DEPTH, NodeCache, load_node_cache
from aggregator.rundir import (
    CONFIG_FILE,
    MODEL_FILE,
    LabelledSplits,
    further_folds,
    labelled_splits,
    make_run_config,
    read_config,
    read_model_state,
    save_torch,
    write_json,
    write_metrics,
)
from aggregator.svm import notes as solver_notes
from aggregator.svm.estimator import MultipleAggregationSVM
from aggregator.svm.plots import plot_convergence
from aggregator.svm.solvers import NodeGrams, node_kernel
from storage import FeatureStore

log = logging.getLogger(__name__)

FORMAT = "framepool-svm/1"
C_GRID = (0.1, 1.0, 10.0)
GAMMA_GRID = (0.25, 1.0, 4.0)  # factors on the per-node "scale" gamma (rbf and chi2 kernels)
VALIDATION_FRACTION = 0.1
SELECTION_MAX_VIDEOS = 2000  # the selection grid is fitted on at most about this many videos
MAX_LEVELS = 6  # levels=None chooses the pyramid depth among 1..MAX_LEVELS
MIN_VALIDATION = 100  # validation videos the selection pools before it stops adding folds
MAX_FOLDS = 10
FUSION_GRID = 20  # simplex step 1/20 for the stream weights
EMBED_DIM = 4096  # embeddings longer than this are count-sketched down to it


# ------------------------------------------------------------------------------------ model state
def export_state(est: MultipleAggregationSVM) -> dict[str, Any]:
    """The fitted estimator as plain tensors, keeping only the nodes with ``beta > 0``."""
    beta = np.asarray(est.beta_, dtype=np.float64)
    active = np.flatnonzero(beta > 0)
    state: dict[str, Any] = {
        "beta": torch.from_numpy(beta.copy()),
        "nodes": torch.from_numpy(active.astype(np.int64)),
        "intercept": torch.from_numpy(np.asarray(est.intercept_, dtype=np.float64).copy()),
        "kernel": est.kernel,
        "variant": est.variant,
    }
    if est.kernel == "linear":
        coef = est.coef_.reshape(len(est.coef_), est.n_nodes_, -1)[:, active, :]  # [L, A, d]
        state["coef"] = torch.from_numpy(np.ascontiguousarray(coef, dtype=np.float32))
    else:
        sv = est.support_vectors_[:, active, :]  # [n_sv, A, d]
        state["support_vectors"] = torch.from_numpy(np.ascontiguousarray(sv, dtype=np.float32))
        state["dual_coef"] = torch.from_numpy(np.asarray(est.dual_coef_, dtype=np.float64).copy())
        assert est.gammas_ is not None
        state["gammas"] = torch.from_numpy(np.asarray(est.gammas_[active], dtype=np.float64))
    return state


def standardize(nodes: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """``(nodes - mean) / std`` per feature (float32); unchanged without statistics."""
    if mean is None or std is None:
        return np.asarray(nodes)
    return (np.asarray(nodes, dtype=np.float32) - mean) / std


def node_statistics(nodes: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation ``[d]`` of every feature over all nodes of ``[n, M, d]``
    (float64 accumulation; a spread below 1e-6 becomes 1)."""
    d = nodes.shape[-1]
    total, square, count = np.zeros(d), np.zeros(d), 0
    shift = np.asarray(nodes[:1], dtype=np.float64).reshape(-1, d).mean(0)
    for start in range(0, len(nodes), chunk):
        x = np.asarray(nodes[start : start + chunk], dtype=np.float64).reshape(-1, d) - shift
        total += x.sum(0)
        square += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(square / count - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return (mean + shift).astype(np.float32), std.astype(np.float32)


def stream_decision(state: Mapping[str, Any], nodes: np.ndarray) -> np.ndarray:
    """``[n, L]`` one-vs-rest scores of one stream's exported SVMs on raw node means
    ``[n, M, d]`` (standardised here with the statistics the state carries)."""
    active = state["nodes"].numpy()
    if "mean" in state:
        nodes = standardize(nodes, state["mean"].numpy(), state["std"].numpy())
    x = np.asarray(nodes, dtype=np.float32)[:, active, :]  # [n, A, d]
    n = x.shape[0]
    intercept = state["intercept"].numpy()
    if "coef" in state:
        coef = state["coef"].numpy()  # [L, A, d]
        scores = x.reshape(n, -1).astype(np.float64) @ coef.reshape(len(coef), -1).T
    else:
        beta = state["beta"].numpy()
        sv = state["support_vectors"].numpy()
        dual = state["dual_coef"].numpy()
        gammas = state["gammas"].numpy()
        scores = np.zeros((n, len(dual)))
        for j, m in enumerate(active):
            Km = node_kernel(x[:, j], sv[:, j], str(state["kernel"]), float(gammas[j]))
            scores += beta[m] * (Km @ dual.T)
    return scores + intercept


def class_scores(decision: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n, n_classes]`` scores from ``[n, L]`` one-vs-rest ones over ``classes`` (indices into
    the class names): two classes share one score (s, -s); classes the SVMs never saw get -inf."""
    out = np.full((decision.shape[0], n_classes), -np.inf)
    if decision.shape[1] == 1:
        out[:, classes[0]] = -decision[:, 0]
        out[:, classes[1]] = decision[:, 0]
    else:
        out[:, classes] = decision
    return out


def fused_scores(
    stream_scores: Mapping[str, np.ndarray], weights: Mapping[str, float]
) -> np.ndarray:
    """``sum_s w_s scores_s`` (classes at -inf stay there)."""
    total: np.ndarray | None = None
    for s, sc in stream_scores.items():
        part = np.where(np.isfinite(sc), weights[s] * sc, -np.inf)
        total = part if total is None else total + part
    assert total is not None
    return total


# ------------------------------------------------------------------------------------ calibration
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


def probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of ``scores / temperature`` (-inf scores get probability 0)."""
    return softmax(scores / temperature, axis=1)


# ------------------------------------------------------------------------------------ training
def _node_means(cache: NodeCache, video_ids: list[str], levels: int) -> np.ndarray:
    """``[n, 2^levels - 1, d]`` node means as the cache holds them (float16: half the memory of
    ``NodeCache.take``'s float32 copy, and no precision lost, as the estimator widens blocks)."""
    if cache.means.dtype != np.float16:
        return cache.take(video_ids, levels)
    return np.ascontiguousarray(cache.means[cache.rows(video_ids), : n_nodes(levels)])


def _selection_rows(y_fit: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of the fit videos the selection grid is fitted on: all of them up to ``limit``,
    else a seeded subsample of about ``limit`` with every class in its share (at least one)."""
    if len(y_fit) <= limit:
        return np.arange(len(y_fit))
    from aggregator.data import stratified_holdout

    _, sub = stratified_holdout(y_fit, limit / len(y_fit), seed)
    return sub


def _bound_record(est: MultipleAggregationSVM) -> dict[str, Any]:
    """How many of a fit's SVM solves libsvm stopped at its iteration bound."""
    return {
        "svm_at_bound": est.n_svm_at_bound_,
        "svm_solves": est.n_svm_solves_,
        "svm_iter_bound": est.svm_iter_bound_,
    }


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
            entry: dict[str, Any] = {"n_iter": est.n_iter_, **_bound_record(est)}
            if est.gammas_ is not None:
                entry["gamma_mean"] = float(np.mean(est.gammas_))
            entry["seconds"] = time.perf_counter() - t0
            out.append((values, entry, scores))
    return out


def _selection_folds(splits: LabelledSplits) -> list[np.ndarray]:
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


def _select(
    X_train: np.ndarray,
    splits: LabelledSplits,
    folds: Sequence[np.ndarray],
    depths: Sequence[int],
    params: Mapping[str, Any],
    c_grid: Sequence[float],
    gammas: Sequence[float],
    use_stats: bool,
    seed: int,
) -> tuple[int, list[dict[str, Any]], np.ndarray | None, int]:
    """Fit the grid (pyramid depth x ``C`` x gamma factor) on every fold's fit videos (a
    stratified subsample of at most about :data:`SELECTION_MAX_VIDEOS` of them), standardised
    with their own statistics, and score it on the fold's validation videos. Returns the chosen
    grid point's index, the grid's record (pooled and per-fold top-1), the chosen point's class
    scores on the pooled validation videos (folds in order) and the most videos fitted."""
    n_classes = len(splits.class_names)
    n_train = len(splits.train_ids)
    record: list[dict[str, Any]] = []
    pooled: list[list[np.ndarray]] = []
    fitted = 0
    for k, val in enumerate(folds or [np.zeros(0, dtype=np.int64)]):
        fit = np.setdiff1d(np.arange(n_train), val)  # fold 0: splits.fit_idx, built the same way
        y_fit = splits.y_train[fit]
        fit = fit[_selection_rows(y_fit, SELECTION_MAX_VIDEOS, seed)]
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
    return chosen, record, scores, fitted


@dataclass(frozen=True)
class _StreamFit:
    """One stream's SVMs as the run keeps them, their record, and their class scores."""

    state: dict[str, Any]
    info: dict[str, Any]
    in_features: int
    val_scores: np.ndarray | None
    test_scores: np.ndarray | None


@dataclass(frozen=True)
class _Fusion:
    """Stream weights and softmax temperature, and where they were learned."""

    weights: dict[str, float]
    val_top1: float | None
    temperature: float
    calibration: str


def _grids(
    C: float | None, C_grid: Sequence[float], gamma_grid: Sequence[float] | None, kernel: str
) -> tuple[list[float], list[float]]:
    """The values of ``C`` and of the gamma factor the selection tries."""
    c_grid = [float(C)] if C is not None else [float(c) for c in C_grid]
    if not c_grid:
        raise ValueError("C_grid is empty")
    if gamma_grid is None:
        gamma_grid = GAMMA_GRID if C is None else (1.0,)
    g_grid = [float(g) for g in gamma_grid] if kernel != "linear" else [1.0]
    if not g_grid or any(not math.isfinite(g) or g <= 0 for g in g_grid):
        raise ValueError(f"gamma_grid must hold positive numbers, got {list(gamma_grid)!r}")
    return c_grid, g_grid


def _split_videos(
    store: FeatureStore,
    streams: list[str],
    train_split: str,
    test_split: str | None,
    seed: int,
    val_groups: str = "auto",
) -> LabelledSplits:
    """The data step: labelled training and test videos, and the validation part held out (by
    group when the videos have groups, see :func:`aggregator.rundir.labelled_splits`)."""
    splits = labelled_splits(
        store,
        train_split,
        test_split,
        val_fraction=VALIDATION_FRACTION,
        seed=seed,
        streams=streams,
        val_groups=val_groups,
    )
    n_fit_classes = len(np.unique(splits.y_fit))
    if n_fit_classes < 2:
        raise ValueError(
            f"split {train_split!r} has videos of {n_fit_classes} class(es); "
            "an SVM needs at least 2"
        )
    return splits


def _run_config(
    store: FeatureStore,
    out: Path,
    estimator: MultipleAggregationSVM,
    splits: LabelledSplits,
    train_args: dict[str, Any],
    use_stats: bool,
) -> dict[str, Any]:
    """``config.json`` of the run (``train_args`` holds the arguments of :func:`train_svm`)."""
    streams = train_args["streams"]
    model_fields = {
        "params": {**estimator.get_params(), "C": train_args["C"], "levels": train_args["levels"]},
        "streams": streams,
        "standardize": use_stats,
    }
    extractor = {s: store.extractor.get(s) for s in streams}
    return make_run_config(
        out, store, "svm", model_fields, extractor=extractor, splits=splits, train_args=train_args
    )


def _train_stream(
    store: FeatureStore,
    stream: str,
    splits: LabelledSplits,
    folds: Sequence[np.ndarray],
    train_args: Mapping[str, Any],
    params: Mapping[str, Any],
    use_stats: bool,
) -> _StreamFit:
    """Selection, fit and test scores of one stream: the grid (the pyramid depths, ``C_grid``
    and ``gamma_grid`` of ``train_args``) fitted and scored on the validation folds
    (:func:`_select`), the chosen values refit on the whole training split (``refit``), else
    on fold 0's fit videos. ``params`` are the estimator's."""
    depths, c_grid, g_grid = train_args["depths"], train_args["C_grid"], train_args["gamma_grid"]
    n_classes = len(splits.class_names)
    t_cache = time.perf_counter()
    deepest = max(depths)
    cache = load_node_cache(store, stream, depth=max(CACHE_DEPTH, deepest), progress=False)
    X_train = _node_means(cache, splits.train_ids, deepest)
    in_features = int(X_train.shape[2])
    t_fit = time.perf_counter()
    if not folds:  # nothing to validate on: the tie rule's choice, without fitting the rest
        gamma = min(g_grid, key=lambda g: abs(math.log(g)))
        depths, c_grid, g_grid = [min(depths)], [min(c_grid)], [gamma]
    chosen_i, grid, val_scores, fitted = _select(
        X_train, splits, folds, depths, params, c_grid, g_grid, use_stats, train_args["seed"]
    )
    chosen: dict[str, Any] = {
        k: grid[chosen_i][k] for k in ("levels", "C", "gamma_scale") if k in grid[chosen_i]
    }
    levels = int(chosen.pop("levels"))
    if len(folds) > 1:
        log.info(
            "svm %s: chose %d levels, C %g (validation top-1 %.4f on %d videos in %d folds)",
            stream,
            levels,
            chosen["C"],
            grid[chosen_i]["val_top1"],
            sum(len(f) for f in folds),
            len(folds),
        )
    refitted = bool(train_args["refit"] and len(splits.val_idx))
    rows = np.arange(len(splits.train_ids)) if refitted else splits.fit_idx
    # the probe at the depth the user fixed, else at the reported node-mean probe's depth (one
    # more candidate of the depth selection)
    probe_levels = int(train_args["levels"] or train_args["probe_levels"])
    check = None
    if train_args["probe_start"] and folds and probe_levels <= cache.depth:
        X_probe = _node_means(cache, splits.train_ids, probe_levels)
        check = _probe_on_folds(X_probe, splits, folds, grid[chosen_i]["val_top1"], train_args)
        if check is not None and check["kept"] == "probe":
            del X_train
            kept = _probe_fit(
                cache, stream, splits, X_probe[rows], rows, check, in_features, t_cache, t_fit
            )
            kept.info.update(C_grid=grid, selection_folds=[len(f) for f in folds])
            return kept
        if check is not None:
            check.pop("val_scores")
        del X_probe
    m = n_nodes(levels)
    X = np.asarray(X_train[rows, :m])
    del X_train
    mean, std = node_statistics(X) if use_stats else (None, None)
    X = standardize(X, mean, std)
    est = MultipleAggregationSVM(**{**params, **chosen}).fit(X, splits.y_train[rows])
    del X
    if est.n_svm_at_bound_:
        log.warning(
            "svm %s: libsvm stopped at its bound of %d iterations in %d of %d SVM solves of "
            "the final fit (C %g); their duals are feasible, not optimal",
            stream,
            est.svm_iter_bound_,
            est.n_svm_at_bound_,
            est.n_svm_solves_,
            chosen["C"],
        )
    seconds_fit = time.perf_counter() - t_fit
    state = export_state(est)
    if mean is not None and std is not None:
        state["mean"], state["std"] = torch.from_numpy(mean), torch.from_numpy(std)
    test_scores = None
    if splits.test_ids:
        decision = stream_decision(state, _node_means(cache, splits.test_ids, levels))
        test_scores = class_scores(decision, splits.classes, n_classes)
    info = {
        "kept": "svm",
        "probe_check": check,
        "levels": levels,
        "C": chosen["C"],
        "gamma_scale": chosen.get("gamma_scale"),
        "C_grid": grid,
        "selection_videos": fitted,
        "selection_folds": [len(f) for f in folds],
        "refit": refitted,
        "n_iter": est.n_iter_,
        "gap": est.gap_,
        "objective": est.objective_,
        "active_nodes": int((est.beta_ > 0).sum()),
        **_bound_record(est),
        "seconds_node_cache": t_fit - t_cache,
        "seconds_fit": seconds_fit,
        "history": [{k: v for k, v in h.items() if k != "beta"} for h in est.history_],
    }
    log.info(
        "svm %s: %d levels, C %g, %d iterations, gap %.2g, J %.6g, %.1f s",
        stream,
        levels,
        chosen["C"],
        est.n_iter_,
        est.gap_,
        est.objective_,
        seconds_fit,
    )
    return _StreamFit(state, info, in_features, val_scores, test_scores)


def _probe_on_folds(
    X: np.ndarray,
    splits: LabelledSplits,
    folds: Sequence[np.ndarray],
    svm_top1: float,
    train_args: Mapping[str, Any],
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
        probe = fit_linear_probe(flat[fit], splits.y_train[fit], seed=train_args["seed"])
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


def _probe_fit(
    cache: NodeCache,
    stream: str,
    splits: LabelledSplits,
    X: np.ndarray,
    rows: np.ndarray,
    check: dict[str, Any],
    in_features: int,
    t_cache: float,
    t_fit: float,
) -> _StreamFit:
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
        nodes = _node_means(cache, splits.test_ids, check["levels"])
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
    return _StreamFit(state, info, in_features, val_scores, test_scores)


def _calibrate(fits: Mapping[str, _StreamFit], y_val: np.ndarray) -> _Fusion:
    """Fusion weights and temperature learned on the pooled validation folds' scores of the
    chosen values (equal weights and temperature 1 without a validation video)."""
    val_scores = {s: f.val_scores for s, f in fits.items() if f.val_scores is not None}
    if len(y_val):
        weights, val_top1 = choose_fusion(val_scores, y_val)
        temperature = fit_temperature(fused_scores(val_scores, weights), y_val)
        return _Fusion(weights, val_top1, temperature, "validation")
    log.warning("no validation video: equal stream weights and temperature 1")
    weights = {s: 1.0 / len(fits) for s in fits}
    return _Fusion(weights, None, 1.0, "none (no validation video)")


def _test_metrics(
    fits: Mapping[str, _StreamFit], fusion: _Fusion, splits: LabelledSplits
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of the fused probabilities on the test split, and each stream's own."""
    names = splits.class_names
    if not splits.test_ids:
        return classification_metrics(np.zeros((0, len(names))), np.zeros(0), names), {}
    test_scores = {s: f.test_scores for s, f in fits.items() if f.test_scores is not None}
    fused = fused_scores(test_scores, fusion.weights)
    metrics = classification_metrics(probabilities(fused, fusion.temperature), splits.y_test, names)
    per_stream = {}
    for s, sc in test_scores.items():
        m = classification_metrics(sc, splits.y_test, names)
        per_stream[s] = {k: m[k] for k in ("top1", "top5", "mean_class_accuracy")}
    return metrics, per_stream


def _probes(
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


def _summary(
    config: Mapping[str, Any],
    splits: LabelledSplits,
    fits: Mapping[str, _StreamFit],
    fusion: _Fusion,
    per_stream: dict[str, Any],
    probes: dict[str, Any] | None,
) -> dict[str, Any]:
    """What ``metrics.json`` records beside the test metrics."""
    info = {s: f.info for s, f in fits.items()}
    refitted = any(i["refit"] for i in info.values())
    return {
        "run_id": config["run_id"],
        "head": "svm",
        "streams": list(fits),
        "n_train": len(splits.train_ids) if refitted else len(splits.fit_idx),
        "n_val": len(splits.val_idx),
        "selection_folds": next(iter(info.values()))["selection_folds"],
        "n_test": len(splits.test_ids),
        "standardize": config["standardize"],
        "probe_check": {s: i["probe_check"] for s, i in info.items()},
        "beta": {s: beta_by_level(f.state["beta"].numpy()) for s, f in fits.items()},
        "fusion_weights": fusion.weights,
        "temperature": fusion.temperature,
        "calibration": fusion.calibration,
        "val_top1": fusion.val_top1,
        "per_stream": per_stream or None,
        "probe": probes,
        "selection": {
            s: {
                "chosen": {"levels": i["levels"], "C": i["C"]}
                | ({"gamma_scale": i["gamma_scale"]} if i["gamma_scale"] is not None else {}),
                "grid": i["C_grid"],
                "videos": i["selection_videos"],
            }
            for s, i in info.items()
        },
        "svm": info,
    }


def _model(
    splits: LabelledSplits, fits: Mapping[str, _StreamFit], fusion: _Fusion
) -> dict[str, Any]:
    """``model.pt``: plain tensors and numbers (``torch.load(weights_only=True)``). ``levels``
    is the deepest stream's: the pyramid's nodes come level by level, so a shallower stream's
    nodes are the first ones of the deeper pyramid."""
    return {
        "format": FORMAT,
        "levels": max(f.info["levels"] for f in fits.values()),
        "classes": torch.from_numpy(splits.classes.astype(np.int64)),
        "fusion_weights": torch.tensor([fusion.weights[s] for s in fits], dtype=torch.float64),
        "temperature": float(fusion.temperature),
        "in_features": {s: f.in_features for s, f in fits.items()},
        "streams": {s: f.state for s, f in fits.items()},
    }


def _write_run(
    out: Path,
    config: Mapping[str, Any],
    model: Mapping[str, Any],
    metrics: dict[str, Any],
    fits: Mapping[str, _StreamFit],
    t_start: float,
) -> dict[str, Any]:
    """Write ``config.json``, ``model.pt``, the plots and ``metrics.json``; return the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, config)
    save_torch(model, out / MODEL_FILE)
    betas = {s: f.state["beta"].numpy() for s, f in fits.items()}
    title = f"{out.name} (svm)"
    histories = {s: f.info["history"] for s, f in fits.items() if f.info["history"]}
    written = [plots.plot_beta_pyramid(betas, out / "beta_pyramid.png", title=title)]
    if histories:  # a stream that kept its probe has no SVM iterations to draw
        written.append(plot_convergence(histories, out / "svm_convergence.png", title=title))
    if metrics["n_test"]:
        confusion, names = metrics["confusion_matrix"], config["class_names"]
        written.append(plots.plot_confusion(confusion, names, out / "confusion.png", title=title))
    metrics["plots"] = [p.name for p in written]
    return write_metrics(out, metrics, t_start)


def train_svm(
    store: FeatureStore | str | Path,
    out_dir: Path | str,
    *,
    streams: list[str],
    levels: int | None,
    variant: str,
    C: float | None,
    kernel: str,
    train_split: str,
    test_split: str | None,
    seed: int,
    max_iter: int,
    eps: float,
    C_grid: Sequence[float] = C_GRID,
    gamma_grid: Sequence[float] | None = None,
    refit: bool = True,
    val_groups: str = "auto",
    standardize_inputs: bool = True,
    probe: bool = True,
    probe_levels: int = 4,
    svm_max_iter: int | str | None = "auto",
    probe_start: bool = True,
) -> dict[str, Any]:
    """Fit one multiple-aggregation SVM per stream on ``train_split``, evaluate on ``test_split``
    (None: no test), and write the run directory ``out_dir``. Returns the metrics written.

    ``store`` is a FeatureStore or its path (opened writable when possible, to keep the node
    cache). ``levels`` None chooses the pyramid depth among 1 to :data:`MAX_LEVELS` on the
    validation folds. ``C`` None selects it from ``C_grid`` there, and for the rbf/chi2
    kernels a factor on the gamma from ``gamma_grid`` (default :data:`GAMMA_GRID` when ``C`` is
    selected, else 1: a given ``C`` is a fixed configuration). See the module docstring
    for the validation part, selection, refit, fusion, calibration and standardisation.
    ``svm_max_iter`` bounds libsvm's iterations per SVM (see :class:`MultipleAggregationSVM`).
    ``probe_start``: compare the chosen SVM with the node-mean probe (of ``levels`` levels when
    given, else of ``probe_levels``) on the same validation folds and keep the probe (beta
    uniform, the logistic regression's weights) when it validates at least as well.
    """
    t_start = time.perf_counter()
    if isinstance(store, str | Path):
        store = open_store(str(store))
    out = Path(out_dir)
    streams = list(dict.fromkeys(streams))
    if not streams:
        raise ValueError("no stream given")
    if levels is not None and (not isinstance(levels, int) or levels < 1):
        raise ValueError(f"levels must be an integer >= 1 or None, got {levels!r}")
    depths = list(range(1, MAX_LEVELS + 1)) if levels is None else [levels]
    c_grid, g_grid = _grids(C, C_grid, gamma_grid, kernel)
    # the estimator validates C, variant, kernel, max_iter and eps before any work
    estimator = MultipleAggregationSVM(
        C=c_grid[0],
        variant=variant,
        kernel=kernel,
        max_iter=max_iter,
        eps=eps,
        svm_max_iter=svm_max_iter,
        random_state=seed,
    )
    for c in c_grid:
        clone(estimator).set_params(C=c).check_params()
    splits = _split_videos(store, streams, train_split, test_split, seed, val_groups)
    use_stats = standardize_inputs and kernel != "chi2"
    train_args = {
        "streams": streams,
        "levels": levels,
        "depths": depths,
        "variant": variant,
        "C": C,
        "C_grid": c_grid,
        "gamma_grid": g_grid,
        "kernel": kernel,
        "train_split": train_split,
        "test_split": test_split,
        "seed": seed,
        "max_iter": max_iter,
        "eps": eps,
        "svm_max_iter": svm_max_iter,
        "refit": refit,
        "val_groups": val_groups,
        "standardize_inputs": standardize_inputs,
        "probe": probe,
        "probe_levels": probe_levels,
        "probe_start": probe_start,
    }
    config = _run_config(store, out, estimator, splits, train_args, use_stats)
    params = estimator.get_params()
    selecting = len(depths) * len(c_grid) * len(g_grid) > 1
    folds = _selection_folds(splits) if selecting else [np.sort(splits.val_idx)]
    folds = [f for f in folds if len(f)]
    with solver_notes.collecting() as notes:  # counted, reported once (metrics, the CLI)
        fits = {
            s: _train_stream(store, s, splits, folds, train_args, params, use_stats)
            for s in streams
        }
    pooled = np.concatenate(folds) if folds else np.zeros(0, dtype=np.int64)
    fusion = _calibrate(fits, splits.y_train[pooled])
    metrics, per_stream = _test_metrics(fits, fusion, splits)
    probes = _probes(store, streams, splits, probe_levels, seed) if probe else None
    metrics.update(_summary(config, splits, fits, fusion, per_stream, probes))
    metrics["solver_notes"] = notes.as_dict() | {"summary": notes.summary()}
    metrics["warnings"] = chance_warnings(metrics, len(splits.class_names))
    for w in metrics["warnings"]:
        log.warning("svm: %s", w)
    model = _model(splits, fits, fusion)
    return _write_run(out, config, model, metrics, fits, t_start)


# ------------------------------------------------------------------------------------ predictor
class SVMPredictor:
    """A trained ``svm`` run for one video at a time (the :class:`Predictor` protocol)."""

    head = "svm"

    def __init__(self, config: Mapping[str, Any], model: Mapping[str, Any]) -> None:
        if model.get("format") != FORMAT:
            raise ValueError(f"model format {model.get('format')!r} is not {FORMAT!r}")
        self.config = dict(config)
        self.run_id: str = str(config.get("run_id", "run"))
        self.class_names: list[str] = list(config["class_names"])
        self.streams: list[str] = list(config["streams"])
        self.extractor: dict[str, Any] = dict(config.get("extractor") or {})
        self.levels = int(model["levels"])
        self.classes = model["classes"].numpy()
        self.states: dict[str, Any] = dict(model["streams"])
        self.in_features: dict[str, int] = {s: int(d) for s, d in model["in_features"].items()}
        w = model["fusion_weights"].numpy()
        self.fusion_weights = {s: float(w[i]) for i, s in enumerate(self.streams)}
        self.temperature = float(model["temperature"])
        self._sketch: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def load(cls, run_dir: str | Path) -> SVMPredictor:
        config = read_config(run_dir)
        if config.get("head") != "svm":
            raise ValueError(f"run {str(run_dir)!r} has head {config.get('head')!r}, not 'svm'")
        return cls(config, read_model_state(run_dir))

    def nodes(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{stream: [1, M, d]}`` node means of one video's ``{stream: [T, d]}`` features."""
        out = {}
        for s in self.streams:
            if s not in features:
                raise ValueError(
                    f"features lack stream {s!r}; run {self.run_id!r} needs {self.streams}"
                )
            x = np.asarray(features[s])
            if x.ndim != 2 or x.shape[1] != self.in_features[s]:
                raise ValueError(
                    f"stream {s!r} features must be [T, {self.in_features[s]}], got {x.shape}"
                )
            out[s] = node_means(x, self.levels)[None]
        return out

    def scores_nodes(self, nodes: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[n, C]`` fused class scores of node means ``{stream: [n, M, d]}``."""
        per_stream = {
            s: class_scores(
                stream_decision(self.states[s], nodes[s]), self.classes, len(self.class_names)
            )
            for s in self.streams
        }
        return fused_scores(per_stream, self.fusion_weights)

    def predict_proba_nodes(self, nodes: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[n, C]`` class probabilities of node means ``{stream: [n, M, d]}``."""
        return probabilities(self.scores_nodes(nodes), self.temperature)

    def predict_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[C]`` class probabilities (sum to 1) of one video."""
        return self.predict_proba_nodes(self.nodes(features))[0]

    def feature_map(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """The fused kernel's feature map: per stream ``sqrt(w_s)`` times the concatenated
        ``sqrt(beta_m) psi_m`` of the active nodes (concat) or ``sum_m beta_m psi_m`` (average),
        so that inner products are ``sum_s w_s K_s``."""
        parts = []
        for s, x in self.nodes(features).items():
            state = self.states[s]
            if "mean" in state:
                x = standardize(x, state["mean"].numpy(), state["std"].numpy())
            active = state["nodes"].numpy()
            beta = state["beta"].numpy()[active]
            psi = x[0, active, :].astype(np.float64)  # [A, d]
            if state["variant"] == "average":
                v = (beta[:, None] * psi).sum(axis=0)
            else:
                v = (np.sqrt(beta)[:, None] * psi).ravel()
            parts.append(math.sqrt(self.fusion_weights[s]) * v)
        return np.concatenate(parts)

    def embed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[e]`` float32 embedding: :meth:`feature_map`, count-sketched (a seeded signed hash of
        coordinates into ``EMBED_DIM`` buckets, which preserves inner products in expectation) when
        it is longer than ``EMBED_DIM``."""
        v = self.feature_map(features)
        if v.size <= EMBED_DIM:
            return v.astype(np.float32)
        if self._sketch is None or self._sketch[0].size != v.size:
            rng = np.random.default_rng(0)
            self._sketch = (
                rng.integers(0, EMBED_DIM, size=v.size),
                rng.choice(np.array([-1.0, 1.0]), size=v.size),
            )
        bucket, sign = self._sketch
        return np.bincount(bucket, weights=sign * v, minlength=EMBED_DIM).astype(np.float32)

    def beta(self) -> dict[str, list[list[float]]] | None:
        """Learned node weights per stream, level by level."""
        return {s: beta_by_level(self.states[s]["beta"].numpy()) for s in self.streams}
