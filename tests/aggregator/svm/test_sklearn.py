"""scikit-learn's own estimator checks on MultipleAggregationSVM.

2-D input ``[n, d]`` is one node (a plain SVM: ``n_nodes=None``), so every generic check applies to
the default estimator; the other variants run the same checks on the same 2-D data.
"""

from __future__ import annotations

from typing import Any

from sklearn.utils.estimator_checks import parametrize_with_checks

from aggregator.svm import MultipleAggregationSVM


@parametrize_with_checks(
    [
        MultipleAggregationSVM(),
        MultipleAggregationSVM(variant="average", restarts=2, random_state=0),
        MultipleAggregationSVM(kernel="rbf"),
    ]
)
def test_sklearn_compatible(estimator: Any, check: Any) -> None:
    check(estimator)


def test_node_input_model_clones_pickles_and_fits_in_a_pipeline() -> None:
    import pickle

    import numpy as np
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(0)
    y = np.arange(45) % 3
    X = rng.normal(size=(45, 7, 4))
    X[:, 5] += 3.0 * rng.normal(size=(3, 4))[y]
    est = MultipleAggregationSVM(C=0.5, eps=1e-4).fit(X, y)
    twin = clone(est)
    assert twin.get_params() == est.get_params()
    assert not hasattr(twin, "beta_")
    np.testing.assert_array_equal(twin.fit(X, y).beta_, est.beta_)
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.decision_function(X), est.decision_function(X))
    est.set_params(C=2.0)
    assert est.C == 2.0
    scores = cross_val_score(MultipleAggregationSVM(n_nodes=7), X.reshape(45, -1), y, cv=3)
    assert scores.mean() > 0.8
