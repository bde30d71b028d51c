"""``stpn`` against the linear probes of the pooled streams its maps come from.

A map stream's spatial average is the pooled stream the extractor writes beside it
(``appearance_map`` -> ``appearance``, ``motion_map`` -> ``motion``). ``stpn`` cannot represent
a probe, so, as for the other heads that cannot (:func:`aggregator.train.probe_check`), the
global-mean and node-mean probes of those pooled streams are fitted on the fit videos and scored
on the validation videos the head's epoch was chosen on; the run records both and warns when a
probe validates better. The test split's probes are reported beside the head, as every run
reports them (:func:`aggregator.probe.linear_probes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aggregator.data import load_summaries
from aggregator.intervals import Intervals
from aggregator.probe import MAX_FLOATS, linear_probes
from aggregator.probe_start import ProbeScores, fold_probe_scores, probe_verdict
from aggregator.rundir import LabelledSplits
from storage import FeatureStore

POOLED_OF_MAP = {"appearance_map": "appearance", "motion_map": "motion"}
PROBE_LEVELS = 4


def pooled_streams(store: FeatureStore, video_ids: Sequence[str], maps: Sequence[str]) -> list[str]:
    """The pooled streams of ``maps`` that every one of ``video_ids`` has."""
    names = [POOLED_OF_MAP[m] for m in maps if m in POOLED_OF_MAP]
    return [s for s in names if all(s in store.streams(v) for v in video_ids)]


def map_probes(
    store: FeatureStore,
    maps: Sequence[str],
    splits: LabelledSplits,
    head_val_top1: float | None,
    *,
    levels: int = PROBE_LEVELS,
    seed: int = 0,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """``(test probes, validation check, warnings)`` of a map head whose chosen epoch scored
    ``head_val_top1`` on the validation part of ``splits``; ``(None, None, [])`` when the
    store has no pooled stream of the maps or the training videos hold one class."""
    ids = list(splits.train_ids)
    streams = pooled_streams(store, ids + list(splits.test_ids), maps)
    if not streams or len(np.unique(splits.y_train)) < 2:
        return None, None, []
    probes = None
    if len(splits.test_ids):
        probes = linear_probes(
            store,
            streams,
            ids,
            splits.y_train,
            list(splits.test_ids),
            splits.y_test,
            splits.class_names,
            levels=levels,
            seed=seed,
        )
    fit, val = np.asarray(splits.fit_idx), np.asarray(splits.val_idx)
    spec = Intervals.pyramid(levels)
    width = sum(int(store.read(ids[0], s).shape[1]) for s in streams)
    if not len(val) or len(ids) * spec.count * width > MAX_FLOATS:
        return probes, None, []
    nodes = [load_summaries(store, ids, s, spec, progress=False) for s in streams]
    scores: dict[str, ProbeScores | None] = {}
    for name, count in (("global_mean", 1), ("pyramid_nodes", spec.count)):
        x = np.concatenate([n[:, :count].reshape(len(ids), -1) for n in nodes], axis=1)
        scores[name] = fold_probe_scores(
            x.astype(np.float32), np.asarray(splits.y_train), [(fit, val)], seed=seed
        )
    record, warning = probe_verdict(head_val_top1, scores)
    record.update(levels=levels, streams=streams)
    return probes, record, [warning] if warning else []
