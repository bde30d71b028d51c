"""Train the shallow multiple-aggregation SVM on a store, write a run directory, load it back.

``framepool train --head svm`` calls :func:`train_svm`: one :class:`MultipleAggregationSVM` per
stream (one beta per stream) on the pyramid node means of the store's node cache, the streams'
scores fused with weights, and a run directory like the deep heads' (``config.json``,
``model.pt``, ``metrics.json``, PNGs). :class:`aggregator.svm.predictor.SVMPredictor` loads it as an
:class:`aggregator.predictor.Predictor`.

Fusion weights and probabilities are *learned on validation videos*: a stratified 10% of every
class of the training split (:func:`aggregator.splits.stratified_holdout`, seeded; whole groups when
the videos have them) is held out and the SVMs are fitted on the rest, with more folds on small
data (below). On the held-out videos a grid over the simplex of stream weights
(step 1/20) picks the best top-1 (ties: the most even weights), then a softmax temperature is fitted
by minimum negative log-likelihood. Learned rather than fixed, because two streams' SVM scores have
no reason to be equally reliable (the multiple aggregation paper learns w_a, w_m and finds them
unequal) and SVM scores need a scale before a softmax; on held-out videos, because training
videos' scores sit at the margins the SVMs were fitted to. The test split is never looked at.
Without any validation video (every class has a single training video) the weights are equal, the
temperature is 1, and ``metrics.json`` says so.

The pyramid depth (when ``levels`` is None, among 1 to :data:`aggregator.svm.config.MAX_LEVELS`) and
the soft-margin ``C`` (when not given, from :data:`aggregator.svm.config.C_GRID`) are chosen
together, per stream, by validation top-1 (ties: fewer levels, then the smaller ``C``). A small
validation part is pooled with further folds until :data:`aggregator.svm.selection.MIN_VALIDATION`
videos validate (at most :data:`aggregator.svm.selection.MAX_FOLDS` folds): the next folds of whole
groups when validation holds out groups, else folds with the validation part's count of every class
(:func:`aggregator.rundir.further_folds`); every fold is standardised with statistics of its own fit
videos. A single held-out group of a dozen videos is too few to choose a depth; pooled folds are
not, and an SVM on a few hundred videos fits in seconds (the measured effect is in
``benchmarks/README.md``). The fits across ``C`` of one fold and depth share one
:class:`aggregator.svm.solvers.NodeGrams`, so the node Gram matrices are computed once. The chosen
values are then refit on the whole training split; the fusion weights and temperature are learned on
the chosen values' scores of the pooled validation videos. With more than
:data:`aggregator.svm.selection.SELECTION_MAX_VIDEOS` fit videos a fold's grid is fitted on a
seeded, stratified subsample of about that many, scored on the whole validation part (libsvm's cost
grows faster than n^2 on a hard problem), and the chosen values are always refit on all of them.
libsvm's iterations per SVM are bounded (``MultipleAggregationSVM(svm_max_iter="auto")``); the
solves that stopped at the bound are counted per grid value and for the final fit in
``metrics.json`` and logged.

Node means are standardised per feature with statistics of the training videos (not for the chi2
kernel, which needs non-negative features); the statistics are part of ``model.pt`` and applied by
:class:`aggregator.svm.predictor.SVMPredictor`. Like the deep heads, every run reports the
linear-probe references.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.data import open_store
from aggregator.intervals import n_nodes
from aggregator.metrics import chance_warnings
from aggregator.node_cache import CACHE_DEPTH, NodeCache, load_node_cache
from aggregator.rundir import LabelledSplits, labelled_splits
from aggregator.svm import notes as solver_notes
from aggregator.svm.calibration import calibrate
from aggregator.svm.config import SVMConfig
from aggregator.svm.estimator import MultipleAggregationSVM
from aggregator.svm.fitted import (
    StreamFit,
    bound_record,
    cached_node_means,
    export_state,
    node_statistics,
)
from aggregator.svm.outputs import metrics_on_test, model_state, run_config, summary, write_run
from aggregator.svm.predictor import class_scores, standardize, stream_decision
from aggregator.svm.probes import probe_fit, probe_on_folds, reference_probes
from aggregator.svm.selection import Selection, select_values, selection_folds
from storage import FeatureStore

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.1


def train_svm(
    store: FeatureStore | str | Path,
    out_dir: Path | str,
    config: SVMConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fit one multiple-aggregation SVM per stream on ``config.train_split``, evaluate on
    ``config.test_split`` (None: no test), and write the run directory ``out_dir``. Returns the
    metrics written.

    ``store`` is a FeatureStore or its path (opened writable when possible, to keep the node
    cache). ``config`` holds the options (:class:`aggregator.svm.config.SVMConfig`); keyword
    ``options`` replace its fields (``train_svm(store, out, streams=["motion"], C=1.0)``). See
    the module docstring for the validation part, selection, refit, fusion, calibration and
    standardisation.
    """
    t_start = time.perf_counter()
    if config is None:
        config = SVMConfig(**options)
    elif options:
        config = config.replace(**options)
    if isinstance(store, str | Path):
        store = open_store(str(store))
    out = Path(out_dir)
    streams = list(config.streams)
    splits = _split_videos(store, config)
    run_json = run_config(store, out, config, splits)
    params = config.estimator().get_params()
    folds = selection_folds(splits) if config.selecting else [np.sort(splits.val_idx)]
    folds = [f for f in folds if len(f)]
    with solver_notes.collecting() as notes:  # counted, reported once (metrics, the CLI)
        fits = {s: _train_stream(store, s, splits, folds, config, params) for s in streams}
    pooled = np.concatenate(folds) if folds else np.zeros(0, dtype=np.int64)
    fusion = calibrate(fits, splits.y_train[pooled])
    metrics, per_stream = metrics_on_test(fits, fusion, splits)
    probes = None
    if config.probe:
        probes = reference_probes(store, streams, splits, config.probe_levels, config.seed)
    metrics.update(summary(run_json, splits, fits, fusion, per_stream, probes))
    metrics["solver_notes"] = notes.as_dict() | {"summary": notes.summary()}
    metrics["warnings"] = chance_warnings(metrics, len(splits.class_names))
    for w in metrics["warnings"]:
        log.warning("svm: %s", w)
    model = model_state(splits, fits, fusion)
    return write_run(out, run_json, model, metrics, fits, t_start)


def _split_videos(store: FeatureStore, config: SVMConfig) -> LabelledSplits:
    """The data step: labelled training and test videos, and the validation part held out (by
    group when the videos have groups, see :func:`aggregator.rundir.labelled_splits`)."""
    splits = labelled_splits(
        store,
        config.train_split,
        config.test_split,
        val_fraction=VALIDATION_FRACTION,
        seed=config.seed,
        streams=list(config.streams),
        val_groups=config.val_groups,
    )
    n_fit_classes = len(np.unique(splits.y_fit))
    if n_fit_classes < 2:
        raise ValueError(
            f"split {config.train_split!r} has videos of {n_fit_classes} class(es); "
            "an SVM needs at least 2"
        )
    return splits


def _train_stream(
    store: FeatureStore,
    stream: str,
    splits: LabelledSplits,
    folds: Sequence[np.ndarray],
    config: SVMConfig,
    params: dict[str, Any],
) -> StreamFit:
    """Selection, fit and test scores of one stream: the grid (the config's pyramid depths,
    ``C`` values and gamma factors) fitted and scored on the validation folds
    (:func:`aggregator.svm.selection.select_values`), the chosen values refit on the whole
    training split (``refit``), else on fold 0's fit videos; or the node-mean probe, when it
    validates at least as well (``probe_start``). ``params`` are the estimator's."""
    depths, c_grid, g_grid = config.depths, config.c_values, config.gamma_values
    t_cache = time.perf_counter()
    deepest = max(depths)
    cache = load_node_cache(store, stream, depth=max(CACHE_DEPTH, deepest), progress=False)
    X_train = cached_node_means(cache, splits.train_ids, deepest)
    in_features = int(X_train.shape[2])
    t_fit = time.perf_counter()
    if not folds:  # nothing to validate on: the tie rule's choice, without fitting the rest
        gamma = min(g_grid, key=lambda g: abs(math.log(g)))
        depths, c_grid, g_grid = [min(depths)], [min(c_grid)], [gamma]
    selection = select_values(
        X_train, splits, folds, depths, params, c_grid, g_grid, config.use_stats, config.seed
    )
    levels, chosen = selection.levels, selection.values
    if len(folds) > 1:
        log.info(
            "svm %s: chose %d levels, C %g (validation top-1 %.4f on %d videos in %d folds)",
            stream,
            levels,
            chosen["C"],
            selection.val_top1,
            sum(len(f) for f in folds),
            len(folds),
        )
    refitted = bool(config.refit and len(splits.val_idx))
    rows = np.arange(len(splits.train_ids)) if refitted else splits.fit_idx
    # the probe at the depth the user fixed, else at the reported node-mean probe's depth (one
    # more candidate of the depth selection)
    probe_levels = int(config.levels or config.probe_levels)
    check = None
    if config.probe_start and folds and probe_levels <= cache.depth:
        X_probe = cached_node_means(cache, splits.train_ids, probe_levels)
        check = probe_on_folds(X_probe, splits, folds, selection.val_top1, config.seed)
        if check is not None and check["kept"] == "probe":
            del X_train
            kept = probe_fit(
                cache, stream, splits, X_probe[rows], rows, check, in_features, t_cache, t_fit
            )
            kept.info.update(C_grid=selection.record, selection_folds=[len(f) for f in folds])
            return kept
        if check is not None:
            check.pop("val_scores")
        del X_probe
    X = np.asarray(X_train[rows, : n_nodes(levels)])
    del X_train
    mean, std = node_statistics(X) if config.use_stats else (None, None)
    X = standardize(X, mean, std)
    est = MultipleAggregationSVM(**{**params, **chosen}).fit(X, splits.y_train[rows])
    del X
    fit = _FinalFit(est, mean, std, refitted, time.perf_counter() - t_fit)
    return _svm_stream(
        stream, cache, splits, folds, selection, fit, check, in_features, t_fit - t_cache
    )


@dataclass(frozen=True)
class _FinalFit:
    """The chosen values fitted on the training videos (all of them when ``refitted``), the
    statistics they were standardised with (None: not standardised) and the seconds since the
    selection started."""

    est: MultipleAggregationSVM
    mean: np.ndarray | None
    std: np.ndarray | None
    refitted: bool
    seconds: float


def _svm_stream(
    stream: str,
    cache: NodeCache,
    splits: LabelledSplits,
    folds: Sequence[np.ndarray],
    selection: Selection,
    fit: _FinalFit,
    check: dict[str, Any] | None,
    in_features: int,
    seconds_node_cache: float,
) -> StreamFit:
    """One stream's final SVMs as the run keeps them: the exported state with its statistics,
    its test class scores and its record (with the probe ``check``), logged."""
    est, chosen = fit.est, selection.values
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
    state = export_state(est)
    if fit.mean is not None and fit.std is not None:
        state["mean"], state["std"] = torch.from_numpy(fit.mean), torch.from_numpy(fit.std)
    test_scores = None
    if splits.test_ids:
        decision = stream_decision(
            state, cached_node_means(cache, splits.test_ids, selection.levels)
        )
        test_scores = class_scores(decision, splits.classes, len(splits.class_names))
    info = {
        "kept": "svm",
        "probe_check": check,
        "levels": selection.levels,
        "C": chosen["C"],
        "gamma_scale": chosen.get("gamma_scale"),
        "C_grid": selection.record,
        "selection_videos": selection.videos,
        "selection_folds": [len(f) for f in folds],
        "refit": fit.refitted,
        "n_iter": est.n_iter_,
        "gap": est.gap_,
        "objective": est.objective_,
        "active_nodes": int((est.beta_ > 0).sum()),
        **bound_record(est),
        "seconds_node_cache": seconds_node_cache,
        "seconds_fit": fit.seconds,
        "history": [{k: v for k, v in h.items() if k != "beta"} for h in est.history_],
    }
    log.info(
        "svm %s: %d levels, C %g, %d iterations, gap %.2g, J %.6g, %.1f s",
        stream,
        selection.levels,
        chosen["C"],
        est.n_iter_,
        est.gap_,
        est.objective_,
        fit.seconds,
    )
    return StreamFit(state, info, in_features, selection.val_scores, test_scores)
