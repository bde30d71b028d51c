"""The shallow multiple-aggregation kernel SVM: the estimator, its solvers, runs and plots.

- :mod:`aggregator.svm.estimator`: :class:`MultipleAggregationSVM`, a scikit-learn classifier.
- :mod:`aggregator.svm.solvers`: the alpha-step (libsvm), node Gram matrices, the cutting-plane
  LP and level projection, simplex projection; :mod:`aggregator.svm.kernels` the node kernels.
- :mod:`aggregator.svm.config`: :class:`SVMConfig`, the options of a run.
- :mod:`aggregator.svm.run`: ``framepool train --head svm`` (:func:`train_svm`), with the
  selection of depth and ``C`` (:mod:`aggregator.svm.selection`), the node-mean probe
  (:mod:`aggregator.svm.probes`), the stream fusion (:mod:`aggregator.svm.calibration`) and the
  files of the run (:mod:`aggregator.svm.outputs`).
- :mod:`aggregator.svm.predictor`: a run directory served (:class:`SVMPredictor`); it imports
  no trainer module.
- :mod:`aggregator.svm.plots`: the convergence plot of a run.

Every name is imported on first use: ``from aggregator.svm import MultipleAggregationSVM`` does
not load torch and matplotlib (half a GiB of resident memory), and serving a run through
:mod:`aggregator.svm.predictor` does not load the solvers' cvxpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.svm.config import SVMConfig
    from aggregator.svm.estimator import MultipleAggregationSVM
    from aggregator.svm.kernels import KERNELS
    from aggregator.svm.predictor import SVMPredictor
    from aggregator.svm.run import train_svm
    from aggregator.svm.solvers import NodeGrams

_EXPORTS = {
    "KERNELS": "aggregator.svm.kernels",
    "MultipleAggregationSVM": "aggregator.svm.estimator",
    "NodeGrams": "aggregator.svm.solvers",
    "SVMConfig": "aggregator.svm.config",
    "SVMPredictor": "aggregator.svm.predictor",
    "train_svm": "aggregator.svm.run",
}

__all__ = [
    "KERNELS",
    "MultipleAggregationSVM",
    "NodeGrams",
    "SVMConfig",
    "SVMPredictor",
    "train_svm",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aggregator.svm' has no attribute {name!r}")
