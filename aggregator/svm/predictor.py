"""A trained ``svm`` run served one video at a time (:class:`SVMPredictor`), and the pure
inference functions it shares with the trainer.

A run's ``model.pt`` (written by :func:`aggregator.svm.run.train_svm`) holds per stream the
exported one-vs-rest SVMs of the active nodes (:func:`stream_decision` scores them on raw node
means, standardised with the statistics the state carries), the fusion weights of the streams
(:func:`fused_scores`) and a softmax temperature (:func:`probabilities`). Nothing here imports
the trainer, its solvers or its selection: serving a run needs numpy, scipy's softmax and the
node kernels (:mod:`aggregator.svm.kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from aggregator.intervals import node_means
from aggregator.metrics import beta_by_level
from aggregator.rundir import read_config, read_model_state
from aggregator.svm.kernels import node_kernel

FORMAT = "framepool-svm/1"
EMBED_DIM = 4096  # embeddings longer than this are count-sketched down to it


def standardize(nodes: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """``(nodes - mean) / std`` per feature (float32); unchanged without statistics."""
    if mean is None or std is None:
        return np.asarray(nodes)
    return (np.asarray(nodes, dtype=np.float32) - mean) / std


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


def probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of ``scores / temperature`` (-inf scores get probability 0)."""
    return softmax(scores / temperature, axis=1)


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
