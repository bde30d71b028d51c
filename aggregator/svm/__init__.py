"""The shallow multiple-aggregation kernel SVM: the estimator, its solvers, runs and plots.

- :mod:`aggregator.svm.estimator`: :class:`MultipleAggregationSVM`, a scikit-learn classifier.
- :mod:`aggregator.svm.solvers`: the alpha-step (libsvm), node Gram matrices, the cutting-plane
  LP and level projection, simplex projection.
- :mod:`aggregator.svm.run`: ``framepool train --head svm`` (:func:`train_svm`) and the run
  directory's predictor (:class:`SVMPredictor`).
- :mod:`aggregator.svm.plots`: the convergence plot of a run.
"""

from aggregator.svm.estimator import MultipleAggregationSVM
from aggregator.svm.run import SVMPredictor, train_svm
from aggregator.svm.solvers import KERNELS, NodeGrams

__all__ = ["KERNELS", "MultipleAggregationSVM", "NodeGrams", "SVMPredictor", "train_svm"]
