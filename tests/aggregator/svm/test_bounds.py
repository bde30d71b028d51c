"""libsvm's iteration bound per SVM and the selection on a subsample of the fit videos: both are
counted, warned about and recorded, never silent."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from aggregator.svm import MultipleAggregationSVM
from aggregator.svm import selection as svm_selection
from aggregator.svm.run import train_svm
from aggregator.svm.solvers import (
    SVM_ITER_PER_SAMPLE,
    SVM_WORK_MIN,
    alpha_step,
    dual_values,
    libsvm_iterations,
    ovr_targets,
)
from tests.aggregator.svm.test_run import order_store, run_args


def noise_nodes(
    n: int = 120, m_nodes: int = 3, d: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels independent of the features: a hard, non-separable problem for a large C."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, m_nodes, d)), np.arange(n) % 3


def test_libsvm_iterations() -> None:
    # small problems: a fixed amount of work (iterations x samples); large ones: 100 per sample
    assert libsvm_iterations(100, "auto") == SVM_WORK_MIN // 100
    n = 10_000
    assert SVM_ITER_PER_SAMPLE * n > SVM_WORK_MIN // n
    assert libsvm_iterations(n, "auto") == SVM_ITER_PER_SAMPLE * n
    assert libsvm_iterations(n, None) == -1
    assert libsvm_iterations(n, 7) == 7
    with pytest.raises(ValueError, match="svm_max_iter"):
        libsvm_iterations(n, "fast")
    with pytest.raises(ValueError, match="positive"):
        libsvm_iterations(n, 0)


def test_alpha_step_at_the_bound_is_counted_and_feasible() -> None:
    """A solve stopped at the bound keeps a feasible alpha: its dual objective stays a valid
    lower bound (a cut) below the exact one."""
    X, y = noise_nodes()
    K = X.reshape(len(X), -1) @ X.reshape(len(X), -1).T
    Y = ovr_targets(y, 3)
    exact = alpha_step(K, Y, C=10.0, tol=1e-4)
    assert exact.at_bound == 0
    bounded = alpha_step(K, Y, C=10.0, tol=1e-4, max_iter=5)
    assert bounded.at_bound == 3
    for col in range(3):
        u = bounded.U[:, col]
        assert np.all(u * Y[:, col] >= -1e-12) and np.all(np.abs(u) <= 10.0 + 1e-9)
        assert abs(u.sum()) < 1e-8
    assert np.all(dual_values(K, bounded) <= dual_values(K, exact) + 1e-6)
    two = alpha_step(K, Y, C=10.0, tol=1e-4, max_iter=5, n_jobs=2)
    assert two.at_bound == 3


@pytest.mark.parametrize("variant", ["concat", "average"])
def test_fit_warns_and_counts_solves_at_the_bound(variant: str) -> None:
    X, y = noise_nodes()
    est = MultipleAggregationSVM(C=100.0, variant=variant, svm_max_iter=5, max_iter=3, restarts=1)
    with pytest.warns(ConvergenceWarning, match=r"svm_max_iter=5 iterations in \d+ of \d+"):
        est.fit(X, y)
    assert est.svm_iter_bound_ == 5
    assert 0 < est.n_svm_at_bound_ <= est.n_svm_solves_
    assert est.n_svm_solves_ % 3 == 0  # three one-vs-rest SVMs per alpha-step
    if variant == "concat":
        assert est.n_svm_solves_ == 3 * est.n_iter_
        assert sum(h["svm_at_bound"] for h in est.history_) == est.n_svm_at_bound_


def test_default_bound_is_silent_on_an_easy_problem() -> None:
    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    X = rng.normal(size=(90, 3, 4))
    X[:, 1, :] += 3.0 * rng.normal(size=(3, 4))[y]
    est = MultipleAggregationSVM(C=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est.fit(X, y)
    assert est.svm_iter_bound_ == libsvm_iterations(90, "auto") and est.n_svm_at_bound_ == 0
    assert est.n_svm_solves_ == 3 * est.n_iter_


def test_selection_rows_are_a_stratified_subsample() -> None:
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    assert np.array_equal(svm_selection.selection_rows(y, 100, seed=0), np.arange(100))
    rows = svm_selection.selection_rows(y, 40, seed=0)
    assert abs(len(rows) - 40) <= 4 and len(np.unique(rows)) == len(rows)
    assert set(np.unique(y[rows])) == {0, 1, 2, 3}
    assert np.array_equal(rows, svm_selection.selection_rows(y, 40, seed=0))


@pytest.mark.parametrize("refit", [True, False])
def test_selection_on_a_subsample_refits_on_every_video(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refit: bool
) -> None:
    """Beyond SELECTION_MAX_VIDEOS fit videos the grid sees a subsample; the final SVMs are
    fitted on all training videos (refit) or on all fit videos (no refit), and metrics.json
    says how many videos the selection used and how many solves hit libsvm's bound."""
    monkeypatch.setattr(svm_selection, "SELECTION_MAX_VIDEOS", 20)
    store = order_store(tmp_path / "store.zarr", n_train=10, n_test=2, seed=3)
    with pytest.warns(ConvergenceWarning, match="svm_max_iter=3 iterations"):
        metrics = train_svm(
            store,
            tmp_path / "run",
            **run_args(
                streams=["appearance"], C=None, C_grid=(0.1, 100.0), probe=False, refit=refit
            ),
            svm_max_iter=3,
        )
    info = metrics["svm"]["appearance"]
    assert metrics["n_val"] == 6
    assert 6 <= info["selection_videos"] <= 26  # about 20 of the 54 fit videos, every class
    assert metrics["selection"]["appearance"]["videos"] == info["selection_videos"]
    assert metrics["n_train"] == (60 if refit else 54)
    assert info["refit"] is refit
    for entry in info["C_grid"]:
        assert entry["svm_iter_bound"] == 3
        assert 0 < entry["svm_at_bound"] <= entry["svm_solves"]
    assert info["svm_iter_bound"] == 3 and 0 < info["svm_at_bound"] <= info["svm_solves"]
    assert info["svm_solves"] == 6 * info["n_iter"]
