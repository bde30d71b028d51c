"""The shallow multiple-aggregation kernel SVM: the estimator, its solvers, runs and plots.

- :mod:`aggregator.svm.estimator`: :class:`MultipleAggregationSVM`, a scikit-learn classifier.
- :mod:`aggregator.svm.solvers`: the alpha-step (libsvm), node Gram matrices, the cutting-plane
  LP and level projection, simplex projection.
- :mod:`aggregator.svm.run`: ``framepool train --head svm`` (:func:`train_svm`) and the run
  directory's predictor (:class:`SVMPredictor`).
- :mod:`aggregator.svm.plots`: the convergence plot of a run.

The estimator and its solvers need numpy, scipy, scikit-learn and cvxpy only; the run's names
are imported on first use, so that ``from aggregator.svm import MultipleAggregationSVM`` does not
load torch and matplotlib (half a GiB of resident memory).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from aggregator.svm.estimator import MultipleAggregationSVM
from aggregator.svm.solvers import KERNELS, NodeGrams

if TYPE_CHECKING:
    from aggregator.svm.run import SVMPredictor, train_svm

_RUN_EXPORTS = ("SVMPredictor", "train_svm")

__all__ = ["KERNELS", "MultipleAggregationSVM", "NodeGrams", "SVMPredictor", "train_svm"]


def __getattr__(name: str) -> Any:
    if name in _RUN_EXPORTS:
        return getattr(importlib.import_module("aggregator.svm.run"), name)
    raise AttributeError(f"module 'aggregator.svm' has no attribute {name!r}")
