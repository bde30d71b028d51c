"""Step 1 of a deep-head run (:mod:`aggregator.train`): the videos in memory order, the
summaries the head reads (in memory or streamed from the node cache) and the standardisation
statistics of the training videos."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from aggregator.data import NodeTensors, load_node_data, load_node_tensors
from aggregator.heads.standardize import RunningMoments
from aggregator.intervals import Intervals
from aggregator.node_cache import NodeBlocks
from aggregator.rundir import LabelledSplits, labelled_splits
from aggregator.train_config import TrainConfig
from storage import FeatureStore

__all__ = ["RunData", "fp32_budget", "prepare_data", "standardization_stats"]


def fp32_budget() -> int:
    """Bytes of node tensors held as float32 (else float16, converted batch by batch): a third of
    the memory available now, 4 GiB where that cannot be read."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 3
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class RunData:
    """The videos of a run in memory order: fit rows, then validation rows (each in a seeded
    random order, so that windows of rows are random batches), then test rows."""

    store: FeatureStore
    class_names: list[str]
    in_features: dict[str, int]
    train_ids: list[str]
    video_ids: list[str]
    labels: np.ndarray
    n_fit: int
    n_val: int
    n_test: int
    splits: LabelledSplits
    nodes: NodeTensors | NodeBlocks | None  # None: frames through a DataLoader
    node_dtype: torch.dtype | None
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows_fit(self) -> np.ndarray:
        return np.arange(self.n_fit)

    @property
    def rows_val(self) -> np.ndarray:
        return np.arange(self.n_fit, self.n_fit + self.n_val)

    @property
    def rows_train(self) -> np.ndarray:
        return np.arange(self.n_fit + self.n_val)

    @property
    def rows_test(self) -> np.ndarray:
        return np.arange(self.n_fit + self.n_val, len(self.video_ids))


def standardization_stats(
    nodes: NodeTensors | NodeBlocks, rows: np.ndarray, chunk: int = 256
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per stream, the mean and standard deviation ``[d]`` of every feature over the summaries
    of ``rows`` (all their nodes or leaves), accumulated in float64 chunk by chunk (in memory or
    streamed from the out-of-core node cache alike)."""
    if len(rows) == 0:
        raise ValueError("no training video to compute standardisation statistics from")
    rows = np.asarray(rows)
    if isinstance(nodes, NodeBlocks):  # order-free: in store order, each cache block read once
        rows = rows[nodes.store_order(rows)]
    moments = RunningMoments()
    for batch, _, _ in nodes.batches(rows, chunk, dtype=torch.float32):
        for s, v in batch.items():
            moments.add(s, v)
    return moments.result()


def prepare_data(
    store: FeatureStore,
    config: TrainConfig,
    specs: Mapping[str, Intervals],
    leaves: list[str],
    *,
    progress: bool = False,
) -> RunData:
    """Step 1: splits, validation part, summaries in memory, standardisation statistics."""
    t0 = time.perf_counter()
    splits = labelled_splits(
        store,
        config.train_split,
        config.test_split,
        val_fraction=config.val_fraction,
        seed=config.seed,
        streams=config.streams,
        val_groups=config.val_groups,
    )
    rng = np.random.default_rng(config.seed)
    fit_idx = splits.fit_idx[rng.permutation(len(splits.fit_idx))]
    val_idx = splits.val_idx[rng.permutation(len(splits.val_idx))]
    splits = replace(splits, fit_idx=fit_idx, val_idx=val_idx)  # rows in this seeded order
    class_names, train_ids, test_ids = splits.class_names, splits.train_ids, splits.test_ids
    y_train, y_test = splits.y_train, splits.y_test
    ids = [train_ids[i] for i in fit_idx] + [train_ids[i] for i in val_idx] + list(test_ids)
    labels = np.concatenate([y_train[fit_idx], y_train[val_idx], y_test]).astype(np.int64)
    in_features = {s: int(store.read(train_ids[0], s).shape[1]) for s in config.streams}
    n_train = len(fit_idx) + len(val_idx)

    data: NodeTensors | NodeBlocks | None = None
    hold: torch.dtype | None = None
    bf16 = config.precision == "bf16"
    if config.inputs == "nodes":
        counts = {
            s: (1 << (len(specs[s].parts) - 1)) if s in leaves else specs[s].count
            for s in config.streams
        }
        n_bytes = 4 * len(ids) * sum(counts[s] * in_features[s] for s in config.streams)
        # bf16 keeps the cache's float16 (batches converted as they go); fp32 while it fits
        hold = torch.float32 if not bf16 and n_bytes <= fp32_budget() else torch.float16
        data = load_node_data(
            store, ids, labels, specs, dtype=hold, leaves=leaves, progress=progress
        )
        stats_source: NodeTensors | NodeBlocks = data
        stats_rows = np.arange(n_train)
    else:  # the statistics still come from the summaries the head reads, as on the nodes path
        stats_source = load_node_tensors(
            store, ids[:n_train], labels[:n_train], specs, leaves=leaves, progress=progress
        )
        stats_rows = np.arange(n_train)
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    if config.standardize:
        # selection models see statistics of the videos they fit; the refit those of all
        stats["fit"] = standardization_stats(stats_source, stats_rows[: len(fit_idx)])
        stats["train"] = standardization_stats(stats_source, stats_rows)
    return RunData(
        store=store,
        class_names=class_names,
        in_features=in_features,
        train_ids=train_ids,
        video_ids=ids,
        labels=labels,
        n_fit=len(fit_idx),
        n_val=len(val_idx),
        n_test=len(test_ids),
        splits=splits,
        nodes=data,
        node_dtype=hold,
        stats=stats,
        seconds=time.perf_counter() - t0,
    )
