"""One stream's fitted SVMs as a run keeps them: the estimator exported as plain tensors
(:func:`export_state`), the standardisation statistics, the fit's record, and the node means
the fits read from the store's node cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aggregator.intervals import n_nodes
from aggregator.node_cache import NodeCache

if TYPE_CHECKING:
    from aggregator.svm.estimator import MultipleAggregationSVM


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


def cached_node_means(cache: NodeCache, video_ids: list[str], levels: int) -> np.ndarray:
    """``[n, 2^levels - 1, d]`` node means as the cache holds them (float16: half the memory of
    ``NodeCache.take``'s float32 copy, and no precision lost, as the estimator widens blocks)."""
    if cache.means.dtype != np.float16:
        return cache.take(video_ids, levels)
    return np.ascontiguousarray(cache.means[cache.rows(video_ids), : n_nodes(levels)])


def bound_record(est: MultipleAggregationSVM) -> dict[str, Any]:
    """How many of a fit's SVM solves libsvm stopped at its iteration bound."""
    return {
        "svm_at_bound": est.n_svm_at_bound_,
        "svm_solves": est.n_svm_solves_,
        "svm_iter_bound": est.svm_iter_bound_,
    }


@dataclass(frozen=True)
class StreamFit:
    """One stream's SVMs as the run keeps them, their record, and their class scores."""

    state: dict[str, Any]
    info: dict[str, Any]
    in_features: int
    val_scores: np.ndarray | None
    test_scores: np.ndarray | None
