"""The per-node kernels of the multiple-aggregation SVM, ``kappa(A, B)`` for one node.

Training (:mod:`aggregator.svm.solvers`) and serving (:mod:`aggregator.svm.predictor`) both
evaluate them; they live apart from the solvers so that a served run needs numpy and
scikit-learn's pairwise distances only, not the solvers' cvxpy and libsvm.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics.pairwise import additive_chi2_kernel, euclidean_distances

KERNELS = ("linear", "rbf", "chi2")


def node_kernel(A: np.ndarray, B: np.ndarray, kernel: str, gamma: float) -> np.ndarray:
    """``kappa(A, B)`` for one node: ``A [p, d]``, ``B [q, d]`` -> ``[p, q]``."""
    if kernel == "linear":
        return A @ B.T
    if kernel == "rbf":
        A64 = np.asarray(A, dtype=np.float64)
        B64 = np.asarray(B, dtype=np.float64)
        D = euclidean_distances(A64, B64, squared=True)
        return np.exp(-gamma * D)
    if kernel == "chi2":
        D = -additive_chi2_kernel(np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64))
        return np.exp(-gamma * D)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
