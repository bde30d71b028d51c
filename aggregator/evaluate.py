"""Evaluate a trained run on a split of a store, and summarise runs over splits."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.data import label_indices, load_node_tensors, open_store, split_videos
from aggregator.metrics import classification_metrics
from aggregator.runs import TorchRun, load_run
from aggregator.train import METRICS_FILE, pyramid_leaf_streams, write_json

SUMMARY_KEYS = ("top1", "top5", "mean_class_accuracy")


def evaluation_file(split: str) -> str:
    """``evaluation-<split>.json`` with the split name made file-safe."""
    return "evaluation-" + re.sub(r"[^A-Za-z0-9._-]+", "_", split) + ".json"


def config_differences(run: Any, store: Any) -> str:
    """The fields where two extractor configs differ, as ``key: run value != store value``."""
    if not isinstance(run, dict) or not isinstance(store, dict):
        return f"run {run}, store {store}"
    keys = sorted(set(run) | set(store), key=str)
    parts = [
        f"{k}: {run.get(k, '(absent)')} (run) != {store.get(k, '(absent)')} (store)"
        for k in keys
        if run.get(k) != store.get(k)
    ]
    return "; ".join(parts)


def evaluate_run(
    run_dir: str | Path,
    store_path: str | Path,
    *,
    split: str = "test",
    batch_size: int = 512,
    write: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of ``run_dir``'s model on the complete videos of ``split`` in ``store_path``.

    The store must hold the run's streams extracted with the same extractor config. Torch runs
    read the node cache (built if needed); other runs (``svm``) go video by video through their
    predictor. Written to ``<run_dir>/evaluation-<split>.json`` unless ``write`` is False.
    """
    t0 = time.perf_counter()
    predictor = load_run(run_dir)
    store = open_store(str(store_path))
    recorded = store.extractor
    for s in predictor.streams:
        want = predictor.extractor.get(s)
        have = recorded.get(s)
        if want != have:
            raise ValueError(
                f"the {s} features of store {store.path} come from another extractor than run "
                f"{predictor.run_id} was trained on: {config_differences(want, have)}"
            )
    ids = split_videos(store, split)
    y = label_indices(store, ids, predictor.class_names)
    if isinstance(predictor, TorchRun):
        leaves = pyramid_leaf_streams(predictor.model)
        data = load_node_tensors(
            store,
            ids,
            y,
            predictor.input_specs,
            dtype=torch.float16,  # as cached; converted batch by batch
            leaves=leaves,
            progress=progress,
        )
        chunks = []
        for nodes, _, _ in data.batches(np.arange(len(ids)), batch_size):
            chunks.append(predictor.predict_proba_nodes(nodes))
        scores = np.concatenate(chunks)
    else:
        scores = np.stack(
            [predictor.predict_proba({s: store.read(v, s) for s in predictor.streams}) for v in ids]
        )
    metrics = classification_metrics(scores, y, predictor.class_names)
    metrics.update(
        run_id=predictor.run_id,
        head=predictor.head,
        store=store.path,
        split=split,
        seconds=time.perf_counter() - t0,
    )
    if write:
        write_json(Path(run_dir) / evaluation_file(split), metrics)
    return metrics


def summarize_runs(run_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """Mean and standard deviation (ddof=1) of top1, top5 and mean class accuracy over runs
    (e.g. the three UCF101 splits), from each run's ``metrics.json``."""
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = []
    for d in run_dirs:
        path = Path(d) / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{str(d)!r} has no {METRICS_FILE}")
        m = json.loads(path.read_text())
        runs.append({"run": str(d), **{k: m.get(k) for k in (*SUMMARY_KEYS, "head", "n_test")}})
    summary: dict[str, Any] = {"runs": runs, "n_runs": len(runs)}
    for k in SUMMARY_KEYS:
        vals = np.array([r[k] for r in runs if r[k] is not None], dtype=np.float64)
        mean = float(vals.mean()) if len(vals) else math.nan
        std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else math.nan
        summary[k] = {"mean": mean, "std": std, "n": len(vals)}
    heads = sorted({str(r["head"]) for r in runs})
    summary["heads"] = heads
    return summary
