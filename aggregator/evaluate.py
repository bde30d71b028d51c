"""Evaluate a trained run on a split of a store, and summarise runs over splits."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.data import label_indices, load_node_tensors, open_store, split_videos
from aggregator.heads.views import pyramid_leaf_streams
from aggregator.maps.data import MapDataset
from aggregator.maps.predict import MapRun
from aggregator.metrics import classification_metrics
from aggregator.run_loader import TorchRun, load_run
from aggregator.rundir import CONFIG_FILE, evaluation_file, read_metrics, write_json

__all__ = ["SUMMARY_KEYS", "evaluate_run", "evaluation_file", "summarize_runs"]

SUMMARY_KEYS = ("top1", "top5", "mean_class_accuracy")


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
    read the node cache (built if needed); map runs (``stpn``) read padded batches of the map
    streams; other runs (``svm``) go video by video through their predictor. Written to
    ``<run_dir>/evaluation-<split>.json`` unless ``write`` is False.
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
    if isinstance(predictor, MapRun):
        maps = MapDataset(store, ids, predictor.streams, y)
        logits = torch.from_numpy(predictor.logits_of(maps)).double()
        scores = torch.softmax(logits, dim=1).numpy()
    elif isinstance(predictor, TorchRun):
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


# options that may differ between runs averaged together (splits, seeds, where and how fast)
_NOT_CONFIGURATION = {
    "train_split",
    "test_split",
    "seed",
    "device",
    "threads",
    "precision",
    "random_state",
    "n_jobs",
}


def configuration_key(run_dir: str | Path) -> dict[str, Any]:
    """What makes two runs comparable: head, head options, streams, fusion and training options,
    without splits, seeds and devices (from ``config.json``; the head alone without one)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {"head": read_metrics(run_dir).get("head")}
    config = json.loads(path.read_text())
    options = {
        k: v
        for k, v in (config.get("train_args") or {}).items()
        if k not in _NOT_CONFIGURATION and k not in ("head", "streams", "head_kwargs")
    }
    params = {k: v for k, v in (config.get("params") or {}).items() if k not in _NOT_CONFIGURATION}
    key: dict[str, Any] = {
        "head": config.get("head"),
        "head_kwargs": config.get("head_kwargs") or {},
        "streams": config.get("streams"),
        "fusion": config.get("fusion"),
        "options": options,
    }
    if params:
        key["params"] = params
    return key


def _stats(values: list[Any]) -> dict[str, Any]:
    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    mean = float(vals.mean()) if len(vals) else math.nan
    std = float(vals.std(ddof=1)) if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n": len(vals)}


def summarize_runs(run_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """Runs grouped by head and configuration (:func:`configuration_key`), and per group the
    mean and standard deviation (ddof=1; None for a single run) of top1, top5 and mean class
    accuracy (e.g. over the three UCF101 splits), from each run's ``metrics.json``.

    Different heads or configurations are never averaged together: each is its own group. The
    top-level ``top1``/``top5``/``mean_class_accuracy`` exist only when all runs form one group.
    """
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = []
    groups: list[dict[str, Any]] = []
    for d in run_dirs:
        m = read_metrics(d)
        key = configuration_key(d)
        probe = (m.get("probe") or {}) if isinstance(m.get("probe"), dict) else {}
        run = {
            "run": str(d),
            **{k: m.get(k) for k in (*SUMMARY_KEYS, "head", "n_test")},
            "probe_global_mean": (probe.get("global_mean") or {}).get("top1"),
            "probe_pyramid_nodes": (probe.get("pyramid_nodes") or {}).get("top1"),
        }
        runs.append(run)
        for g in groups:
            if g["configuration"] == key:
                g["runs"].append(run)
                break
        else:
            groups.append({"head": key.get("head"), "configuration": key, "runs": [run]})
    for i, g in enumerate(groups):
        g["name"] = (
            f"{g['head']} #{i + 1}"
            if sum(h["head"] == g["head"] for h in groups) > 1
            else str(g["head"])
        )
        g["n_runs"] = len(g["runs"])
        for k in (*SUMMARY_KEYS, "probe_global_mean", "probe_pyramid_nodes"):
            g[k] = _stats([r[k] for r in g["runs"]])
        for r in g["runs"]:
            r["group"] = g["name"]
    summary: dict[str, Any] = {"runs": runs, "n_runs": len(runs), "groups": groups}
    summary["heads"] = sorted({str(r["head"]) for r in runs})
    if len(groups) == 1:
        for k in SUMMARY_KEYS:
            summary[k] = groups[0][k]
    return summary
