"""A head started from its own linear probe, and any head held against the probes.

Every run reports a standardised logistic-regression probe (:mod:`aggregator.probe`). A head
that is a linear classifier on features that can carry the probe's inputs (``gap``: the global
mean; one ``concat`` temporal pyramid with uniform beta, ``tpp``: the node summaries; see
:meth:`aggregator.heads.NodeHead.probe_name`) starts from the probe's solution, so that training
moves away from it only where the validation folds say it helps, and selection keeps whichever
of the trained head and its starting point validates better. A head that cannot represent a
probe is compared with the probes on the same validation folds, and a run says so when a probe
is better. On a few videos per class the trained head's choice is noise; its probe is the
baseline it must not lose to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aggregator.heads import NodeHead, PyramidLeaves, TwoStream, VideoModel
from aggregator.heads.base import NodeInput
from aggregator.intervals import n_nodes, pyramid_parts
from aggregator.probe import MAX_FLOATS, fit_linear_probe
from aggregator.train_config import TrainConfig
from storage import FeatureStore

log = logging.getLogger(__name__)


def resolve_tpp_bins(config: TrainConfig, store: FeatureStore | None = None) -> TrainConfig:
    """``tpp`` in a training run pools the node means of the probe's pyramid (``probe_levels``
    levels: bins 1, 2, 4, 8 by default) unless the user set its pooling or its levels (then the
    head's own defaults, DTPP's maxima at levels 1, 2, 4, fill in the other): its classifier is
    then the node-mean probe's model, which it starts from and is held against. DTPP's maxima
    lost to that probe on the tuning datasets of ``benchmarks/real_sequences.py`` (figures in
    ``benchmarks/README.md``). Where the probe start would not fit its memory budget
    (:data:`aggregator.probe.MAX_FLOATS` for the training videos of ``store``: thousands of
    videos of CNN features), the mean bins would have no probe to start from, and DTPP's
    defaults stay. Recorded in ``head_kwargs``."""
    if config.head != "tpp" or {"pooling", "levels"} & set(config.head_kwargs):
        return config
    if store is not None:
        ids = store.videos(split=config.train_split)
        if ids:
            width = max(int(store.read(ids[0], s).shape[1]) for s in config.streams)
            if len(ids) * n_nodes(config.probe_levels) * width > MAX_FLOATS:
                log.info("tpp: the probe start would not fit, keeping DTPP's node maxima")
                return config
    bins = {"pooling": "average", "levels": pyramid_parts(config.probe_levels)}
    return config.replace(head_kwargs={**config.head_kwargs, **bins})


def model_probe_name(model: VideoModel) -> str | None:
    """The probe every stream head of ``model`` can represent (one name), else None."""
    if not isinstance(model, TwoStream):
        return None
    names = {model.stream_head(s).probe_name() for s in model.streams}
    if len(names) != 1:
        return None
    return next(iter(names))


def probe_start_size(model: VideoModel, n_rows: int) -> int:
    """Feature entries the probe start's logistic regression holds (its largest stream)."""
    if not isinstance(model, TwoStream):
        return 0
    return n_rows * max(model.stream_head(s).feature_dim for s in model.streams)


def probe_columns(head: NodeHead, levels: int | None) -> np.ndarray:
    """The feature columns of ``head`` that carry the node-mean probe's inputs of ``levels``
    levels (None: every column). A head whose probe is ``pyramid_nodes`` lays its features out
    node by node (``tp`` concat: ``node_dim`` per node, ``tpp``: ``d`` per bin); the run's
    node-mean probe, the baseline the head is held against, reads the nodes of the first
    ``levels`` levels, so the head's start is that probe with zero weight on its finer nodes."""
    every = np.arange(head.feature_dim)
    spec = head.input_spec
    if levels is None or head.probe_name() != "pyramid_nodes" or spec.node_indices() is None:
        return every
    if head.feature_dim % spec.count:
        return every
    per_node = head.feature_dim // spec.count
    finest = 1 << (levels - 1)
    in_probe = np.repeat([p <= finest for p in spec.parts], spec.parts)  # [M]
    return np.flatnonzero(np.repeat(in_probe, per_node))


@torch.no_grad()
def start_from_probe(
    model: VideoModel,
    inputs: Mapping[str, NodeInput],
    labels: np.ndarray,
    *,
    seed: int = 0,
    levels: int | None = None,
) -> str | None:
    """Set ``model`` (standardiser statistics already set) to its probe's solution fitted on the
    summaries ``inputs`` of the training rows with ``labels``: every stream head's layers
    before its classifier represent the probe's inputs (:meth:`NodeHead.represent_probe`), and
    its classifier is the logistic regression fitted on its features (for the node-mean probe,
    on the nodes of its first ``levels`` levels only: :func:`probe_columns`). Returns the
    probe's name, or None (model unchanged) when the head cannot represent a probe, the rows
    hold fewer than two classes, or the features would exceed
    :data:`aggregator.probe.MAX_FLOATS` entries."""
    name = model_probe_name(model)
    if name is None or len(np.unique(labels)) < 2:
        return None
    n = len(labels)
    if probe_start_size(model, n) > MAX_FLOATS:
        log.info("the probe start would hold %d features per video: random start", n)
        return None
    assert isinstance(model, TwoStream)
    was_training = model.training
    model.eval()
    x = model.prepare(inputs)
    for s in model.streams:
        head = model.stream_head(s)
        assert isinstance(head, NodeHead)
        nodes = x[s]
        head.represent_probe(nodes.nodes() if isinstance(nodes, PyramidLeaves) else nodes)
        feats = head.features(nodes).double().cpu().numpy()  # [n, feature_dim]
        columns = probe_columns(head, levels)
        # padding features (constant 0) carry nothing
        keep = columns[feats[:, columns].std(0) > 0]
        probe = fit_linear_probe(feats[:, keep], labels, seed=seed)
        w_keep, bias = probe.logits(head.out_features)
        weight = np.zeros((head.out_features, feats.shape[1]))
        weight[:, keep] = w_keep
        head.set_classifier(torch.from_numpy(weight), torch.from_numpy(bias))
    model.train(was_training)
    return name


def trained_head_wins(
    start: Mapping[str, Any], head_top1: float, head_loss: float, head_loss_se: float
) -> bool:
    """Whether a trained head leaves its probe start: it must validate better on both counts,
    more videos right and a pooled loss lower than the start's by more than the standard error
    of the head's pooled loss (``head_loss_se``; NaN: unknown, no margin). This is the
    selection's one-standard-error rule with the start as the most conservative candidate: on
    5 videos per class the chosen head's scores are the best of a grid and of its validation
    passes, and a lead within one standard error is a draw, which the start wins."""
    margin = head_loss_se if math.isfinite(head_loss_se) else 0.0
    return head_top1 > start["val_top1"] and head_loss + margin < start["val_loss"]


def pass_loss_error(history: Sequence[Mapping[str, Any]], step: int, videos: int) -> float:
    """The standard error of the mean validation loss of the validation pass at ``step`` of
    ``history`` on ``videos`` videos (NaN when that pass holds no squared loss)."""
    for h in history:
        if h.get("step") == step and "val_loss_sq" in h and videos > 0:
            return math.sqrt(max(0.0, h["val_loss_sq"] - h["val_loss"] ** 2) / videos)
    return math.nan


@dataclass(frozen=True)
class ProbeScores:
    """A probe's pooled validation scores: top-1, mean cross-entropy, videos."""

    top1: float
    loss: float
    videos: int

    def to_dict(self) -> dict[str, Any]:
        return {"val_top1": self.top1, "val_loss": self.loss, "videos": self.videos}


def fold_probe_scores(
    summaries: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    seed: int = 0,
) -> ProbeScores | None:
    """The probe fitted on every fold's fit rows of ``summaries [n, F]`` and scored on its
    validation rows, pooled (None when a fold's fit rows hold fewer than two classes)."""
    right, loss_sum, videos = 0, 0.0, 0
    for fit, val in folds:
        if len(np.unique(labels[fit])) < 2 or not len(val):
            return None
        probe = fit_linear_probe(summaries[fit], labels[fit], seed=seed)
        n_classes = int(labels.max()) + 1
        w, b = probe.logits(n_classes)
        z = np.asarray(summaries[val], dtype=np.float64) @ w.T + b  # [n_val, C]
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        y = labels[val]
        right += int((z.argmax(1) == y).sum())
        loss_sum += float(-logp[np.arange(len(y)), y].sum())
        videos += len(val)
    if not videos:
        return None
    return ProbeScores(right / videos, loss_sum / videos, videos)


def probe_verdict(
    head_top1: float | None, probes: Mapping[str, ProbeScores | None]
) -> tuple[dict[str, Any], str | None]:
    """The record of a head that cannot represent a probe against the probes' pooled
    validation scores, and a warning when the best probe validates better than the head."""
    scored = {k: v for k, v in probes.items() if v is not None}
    record: dict[str, Any] = {k: v.to_dict() for k, v in scored.items()}
    record["head_val_top1"] = head_top1
    if not scored or head_top1 is None or not math.isfinite(head_top1):
        record["probe_better"] = None
        return record, None
    best = max(scored, key=lambda k: scored[k].top1)
    record["best_probe"] = best
    better = scored[best].top1 > head_top1
    record["probe_better"] = better
    if not better:
        return record, None
    return record, (
        f"the {best} probe validates better than this head ({100 * scored[best].top1:.1f}% "
        f"against {100 * head_top1:.1f}% on {scored[best].videos} validation videos): "
        "prefer the probe's model (the gap head on the global mean, tp concat on the nodes)"
    )
