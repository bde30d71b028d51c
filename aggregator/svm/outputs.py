"""What an SVM run writes: ``config.json`` (:func:`run_config`), ``model.pt``
(:func:`model_state`), the plots and ``metrics.json`` (:func:`write_run`), with the test
metrics (:func:`metrics_on_test`) and the record of selection, fusion and probes
(:func:`summary`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator import plots
from aggregator.metrics import beta_by_level, classification_metrics
from aggregator.rundir import (
    CONFIG_FILE,
    MODEL_FILE,
    LabelledSplits,
    make_run_config,
    save_torch,
    write_json,
    write_metrics,
)
from aggregator.svm.calibration import Fusion
from aggregator.svm.config import SVMConfig
from aggregator.svm.fitted import StreamFit
from aggregator.svm.plots import plot_convergence
from aggregator.svm.predictor import FORMAT, fused_scores, probabilities
from storage import FeatureStore


def run_config(
    store: FeatureStore, out: Path, config: SVMConfig, splits: LabelledSplits
) -> dict[str, Any]:
    """``config.json`` of the run (its ``train_args`` are :meth:`SVMConfig.to_dict`)."""
    streams = list(config.streams)
    params = config.estimator().get_params()
    model_fields = {
        "params": {**params, "C": config.C, "levels": config.levels},
        "streams": streams,
        "standardize": config.use_stats,
    }
    extractor = {s: store.extractor.get(s) for s in streams}
    train_args = config.to_dict()
    return make_run_config(
        out, store, "svm", model_fields, extractor=extractor, splits=splits, train_args=train_args
    )


def metrics_on_test(
    fits: Mapping[str, StreamFit], fusion: Fusion, splits: LabelledSplits
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


def summary(
    run_json: Mapping[str, Any],
    splits: LabelledSplits,
    fits: Mapping[str, StreamFit],
    fusion: Fusion,
    per_stream: dict[str, Any],
    probes: dict[str, Any] | None,
) -> dict[str, Any]:
    """What ``metrics.json`` records beside the test metrics."""
    info = {s: f.info for s, f in fits.items()}
    refitted = any(i["refit"] for i in info.values())
    return {
        "run_id": run_json["run_id"],
        "head": "svm",
        "streams": list(fits),
        "n_train": len(splits.train_ids) if refitted else len(splits.fit_idx),
        "n_val": len(splits.val_idx),
        "selection_folds": next(iter(info.values()))["selection_folds"],
        "n_test": len(splits.test_ids),
        "standardize": run_json["standardize"],
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


def model_state(
    splits: LabelledSplits, fits: Mapping[str, StreamFit], fusion: Fusion
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


def write_run(
    out: Path,
    run_json: Mapping[str, Any],
    model: Mapping[str, Any],
    metrics: dict[str, Any],
    fits: Mapping[str, StreamFit],
    t_start: float,
) -> dict[str, Any]:
    """Write ``config.json``, ``model.pt``, the plots and ``metrics.json``; return the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, run_json)
    save_torch(model, out / MODEL_FILE)
    betas = {s: f.state["beta"].numpy() for s, f in fits.items()}
    title = f"{out.name} (svm)"
    histories = {s: f.info["history"] for s, f in fits.items() if f.info["history"]}
    written = [plots.plot_beta_pyramid(betas, out / "beta_pyramid.png", title=title)]
    if histories:  # a stream that kept its probe has no SVM iterations to draw
        written.append(plot_convergence(histories, out / "svm_convergence.png", title=title))
    if metrics["n_test"]:
        confusion, names = metrics["confusion_matrix"], run_json["class_names"]
        written.append(plots.plot_confusion(confusion, names, out / "confusion.png", title=title))
    metrics["plots"] = [p.name for p in written]
    return write_metrics(out, metrics, t_start)
