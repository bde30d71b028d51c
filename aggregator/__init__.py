"""Pyramid nodes, pooling heads, trainers, the multiple-aggregation SVM, fine-tuning, evaluation.

Main entry points, imported lazily so that ``import aggregator`` stays cheap for the command line:

- :func:`~aggregator.trainers.train` fits a head from its config
  (:class:`~aggregator.train_config.TrainConfig` for the deep heads, trained by
  :func:`~aggregator.train.train_run`; :class:`~aggregator.train_config.MapTrainConfig` for
  ``stpn``);
- :func:`~aggregator.evaluate.evaluate_run` and :func:`~aggregator.evaluate.summarize_runs` score;
- :func:`~aggregator.run_loader.load_run` loads a run as a :class:`~aggregator.predictor.Predictor`;
- :func:`~aggregator.heads.build_model` and ``HEADS``: the pooling heads;
- :class:`~aggregator.svm.MultipleAggregationSVM`: the SVM as a scikit-learn estimator;
- :func:`~aggregator.finetune.run_finetune_job`: end-to-end fine-tuning of the backbones;
- :class:`~aggregator.similarity.SimilarityIndex` and :func:`~aggregator.similarity.build_index`:
  the nearest training videos.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HEADS": "aggregator.heads",
    "build_model": "aggregator.heads",
    "Intervals": "aggregator.intervals",
    "MultipleAggregationSVM": "aggregator.svm",
    "Predictor": "aggregator.predictor",
    "SimilarityIndex": "aggregator.similarity",
    "TorchRun": "aggregator.run_loader",
    "MapTrainConfig": "aggregator.train_config",
    "TrainConfig": "aggregator.train_config",
    "build_index": "aggregator.similarity",
    "evaluate_run": "aggregator.evaluate",
    "run_finetune_job": "aggregator.finetune",
    "load_run": "aggregator.run_loader",
    "summarize_runs": "aggregator.evaluate",
    "train_run": "aggregator.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aggregator' has no attribute {name!r}")
