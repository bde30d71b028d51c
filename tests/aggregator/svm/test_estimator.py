"""The multiple-aggregation SVM against independent oracles: a direct cvxpy solve of the SVM dual,
a brute-force grid over the simplex, plain scikit-learn SVMs, finite differences."""

from __future__ import annotations

import itertools
import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import SVC

from aggregator.svm import MultipleAggregationSVM
from aggregator.svm.solvers import (
    NodeGrams,
    alpha_step,
    average_objective,
    dual_values,
    node_kernel,
    ovr_targets,
    pack_upper,
    project_simplex,
    unpack_upper,
)


def informative_nodes(
    n: int, m_nodes: int, d: int, n_classes: int, informative: dict[int, float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``[n, M, d]`` Gaussian noise nodes; node m also carries class means scaled by
    ``informative[m]``. Labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    X = rng.normal(size=(n, m_nodes, d))
    for m, strength in informative.items():
        means = rng.normal(size=(n_classes, d))
        X[:, m, :] += strength * means[y]
    return X, y


def concat_kernel(X: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return sum(b * X[:, m, :] @ X[:, m, :].T for m, b in enumerate(beta))


def svm_dual_cvxpy(K_factor: np.ndarray, y: np.ndarray, C: float) -> float:
    """max 1'a - 1/2 ||F'(a*y)||^2, 0 <= a <= C, y'a = 0, K = F F' (an interior-point solve)."""
    alpha = cp.Variable(len(y))
    objective = cp.sum(alpha) - 0.5 * cp.sum_squares(K_factor.T @ cp.multiply(alpha, y))
    problem = cp.Problem(cp.Maximize(objective), [alpha >= 0, alpha <= C, y @ alpha == 0])
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert problem.status == cp.OPTIMAL
    return float(problem.value)


def grid_J(X: np.ndarray, y: np.ndarray, beta: np.ndarray, C: float, tol: float) -> float:
    Y = ovr_targets(y, len(np.unique(y)))
    K = concat_kernel(X, beta)
    return float(dual_values(K, alpha_step(K, Y, C=C, tol=tol)).sum())


# ---------------------------------------------------------------------------------- alpha-step
@pytest.mark.parametrize("n_classes", [2, 3])
def test_alpha_step_dual_matches_cvxpy(n_classes: int) -> None:
    X, y = informative_nodes(36, 3, 4, n_classes, {1: 1.0}, seed=1)
    beta = np.array([0.2, 0.5, 0.3])
    Y = ovr_targets(y, n_classes)
    K = concat_kernel(X, beta)
    step = alpha_step(K, Y, C=0.7, tol=1e-4)
    ours = dual_values(K, step)
    F = np.concatenate([np.sqrt(b) * X[:, m, :] for m, b in enumerate(beta)], axis=1)
    for col in range(Y.shape[1]):
        u = step.U[:, col]
        assert np.all(u * Y[:, col] >= -1e-12)  # u = alpha * y with alpha >= 0
        assert np.all(np.abs(u) <= 0.7 + 1e-9)
        assert abs(u.sum()) < 1e-8  # y'alpha = 0
        reference = svm_dual_cvxpy(F, Y[:, col], 0.7)
        assert ours[col] == pytest.approx(reference, rel=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # max_iter=1
def test_estimator_objective_is_the_cvxpy_dual_at_uniform_beta() -> None:
    X, y = informative_nodes(30, 3, 4, 3, {2: 1.0}, seed=2)
    est = MultipleAggregationSVM(C=0.5, max_iter=1, tol=1e-4).fit(X, y)
    np.testing.assert_allclose(est.beta_, np.full(3, 1 / 3))
    F = np.concatenate([X[:, m, :] / np.sqrt(3) for m in range(3)], axis=1)
    Y = ovr_targets(y, 3)
    reference = [svm_dual_cvxpy(F, Y[:, c], 0.5) for c in range(3)]
    np.testing.assert_allclose(est.dual_values_, reference, rtol=1e-6)
    assert est.objective_ == pytest.approx(sum(reference), rel=1e-6)
    assert est.history_[0]["upper"] == pytest.approx(est.objective_)


# ---------------------------------------------------------------------------------- beta
@pytest.mark.parametrize(
    "params",
    [
        {"beta_step": "level"},
        {"beta_step": "lp"},
        {"variant": "average"},
        {"kernel": "rbf"},
    ],
)
def test_informative_node_gets_the_largest_weight(params: dict) -> None:
    X, y = informative_nodes(60, 7, 6, 3, {4: 1.5}, seed=3)
    est = MultipleAggregationSVM(random_state=0, **params).fit(X, y)
    assert int(np.argmax(est.beta_)) == 4
    assert est.beta_.sum() == pytest.approx(1.0)
    assert np.all(est.beta_ >= 0)
    assert (est.predict(X) == y).mean() > 0.9


@pytest.fixture(scope="module")
def three_nodes() -> tuple[np.ndarray, np.ndarray, float]:
    """Nodes of unequal use, binary labels, and the minimum of J over a 1/50 simplex grid."""
    X, y = informative_nodes(26, 3, 3, 2, {0: 0.6, 1: 0.9}, seed=4)
    best = np.inf
    for i, j in itertools.product(range(51), range(51)):
        if i + j <= 50:
            beta = np.array([i, j, 50 - i - j]) / 50
            best = min(best, grid_J(X, y, beta, 1.0, 1e-6))
    return X, y, best


@pytest.mark.parametrize("beta_step", ["level", "lp"])
def test_three_nodes_agree_with_brute_force_grid(
    three_nodes: tuple[np.ndarray, np.ndarray, float], beta_step: str
) -> None:
    X, y, grid_best = three_nodes
    est = MultipleAggregationSVM(beta_step=beta_step, eps=1e-7, max_iter=200, tol=1e-6).fit(X, y)
    J = est.objective_
    assert est.gap_ <= 1e-7
    assert abs(grid_best - J) <= 1e-3 * J
    assert grid_best >= J * (1 - 1e-6)  # the grid never beats the optimum by more than 1e-6
    assert grid_J(X, y, est.beta_, 1.0, 1e-6) == pytest.approx(J, rel=1e-6)


@pytest.mark.parametrize("beta_step", ["level", "lp"])
def test_lower_bound_never_decreases_and_gap_closes(beta_step: str) -> None:
    X, y = informative_nodes(50, 7, 5, 3, {1: 0.8, 5: 0.8}, seed=5)
    est = MultipleAggregationSVM(beta_step=beta_step, eps=1e-4, max_iter=200).fit(X, y)
    lower = np.array([h["lower"] for h in est.history_])
    upper = np.array([h["upper"] for h in est.history_])
    gaps = np.array([h["gap"] for h in est.history_])
    scale = upper.max()
    assert np.all(np.diff(lower) >= -1e-9 * scale)
    assert np.all(np.diff(gaps) <= 1e-12)
    assert lower[-1] <= upper.min() * (1 + 1e-6)  # the LP bound stays below every J
    assert est.gap_ <= 1e-4
    assert est.n_iter_ == len(est.history_) < 200
    assert est.objective_ == pytest.approx(upper.min())  # the best iterate is the one returned


def test_lp_and_level_reach_the_same_optimum() -> None:
    X, y = informative_nodes(50, 7, 5, 3, {1: 0.8, 5: 0.8}, seed=5)
    a = MultipleAggregationSVM(beta_step="lp", eps=1e-6, max_iter=300, tol=1e-6).fit(X, y)
    b = MultipleAggregationSVM(beta_step="level", eps=1e-6, max_iter=300, tol=1e-6).fit(X, y)
    assert a.objective_ == pytest.approx(b.objective_, rel=1e-5)


# ---------------------------------------------------------------------------------- average
def test_average_gradient_matches_finite_differences() -> None:
    X, y = informative_nodes(40, 3, 4, 3, {0: 1.0, 2: 0.5}, seed=6)
    Y = ovr_targets(y, 3)
    beta = np.array([0.5, 0.2, 0.3])
    _, grad, _, _ = average_objective(X, beta, Y, C=1.0, tol=1e-9)
    h = 1e-5
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        direction = np.zeros(3)
        direction[i], direction[j] = 1.0, -1.0
        plus = average_objective(X, beta + h * direction, Y, C=1.0, tol=1e-9)[0]
        minus = average_objective(X, beta - h * direction, Y, C=1.0, tol=1e-9)[0]
        assert (plus - minus) / (2 * h) == pytest.approx(grad @ direction, rel=1e-3, abs=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # max_iter=1
def test_average_improves_on_uniform_and_restarts_are_seeded() -> None:
    X, y = informative_nodes(40, 7, 4, 3, {3: 1.0}, seed=7)
    uniform = MultipleAggregationSVM(variant="average", max_iter=1, restarts=1).fit(X, y)
    est = MultipleAggregationSVM(variant="average", restarts=3, random_state=1).fit(X, y)
    again = MultipleAggregationSVM(variant="average", restarts=3, random_state=1).fit(X, y)
    assert est.objective_ < uniform.objective_
    np.testing.assert_array_equal(est.beta_, again.beta_)
    assert {h["restart"] for h in est.history_} == {0, 1, 2}
    assert all(np.isnan(h["lower"]) for h in est.history_)


def test_project_simplex_against_cvxpy() -> None:
    rng = np.random.default_rng(8)
    for _ in range(5):
        v = rng.normal(size=6) * 2
        b = cp.Variable(6)
        cp.Problem(cp.Minimize(cp.sum_squares(b - v)), [b >= 0, cp.sum(b) == 1]).solve()
        np.testing.assert_allclose(project_simplex(v), b.value, atol=1e-6)


# ---------------------------------------------------------------------------------- equivalences
def test_single_node_is_a_plain_linear_svm() -> None:
    X, y = informative_nodes(40, 1, 5, 2, {0: 0.7}, seed=9)
    est = MultipleAggregationSVM(C=0.3, tol=1e-6).fit(X, y)
    ref = SVC(kernel="linear", C=0.3, tol=1e-6).fit(X[:, 0, :], y)
    Xt, _ = informative_nodes(15, 1, 5, 2, {0: 0.7}, seed=10)
    np.testing.assert_allclose(
        est.decision_function(Xt), ref.decision_function(Xt[:, 0, :]), rtol=1e-5, atol=1e-6
    )
    assert est.n_iter_ == 1 and est.gap_ == 0.0


@pytest.mark.parametrize("kernel", ["rbf", "chi2"])
def test_nonlinear_decision_equals_precomputed_svc_at_learned_beta(kernel: str) -> None:
    X, y = informative_nodes(45, 3, 4, 3, {1: 1.0}, seed=11)
    X = np.abs(X)  # chi2 needs non-negative features
    est = MultipleAggregationSVM(kernel=kernel, gamma=0.2, tol=1e-6).fit(X, y)
    Xt = np.abs(informative_nodes(10, 3, 4, 3, {1: 1.0}, seed=12)[0])
    K = sum(b * node_kernel(X[:, m], X[:, m], kernel, 0.2) for m, b in enumerate(est.beta_))
    Kt = sum(b * node_kernel(Xt[:, m], X[:, m], kernel, 0.2) for m, b in enumerate(est.beta_))
    for c in range(3):
        ref = SVC(kernel="precomputed", C=1.0, tol=1e-6).fit(K, np.where(y == c, 1, -1))
        np.testing.assert_allclose(
            est.decision_function(Xt)[:, c], ref.decision_function(Kt), rtol=1e-5, atol=1e-6
        )


def test_flat_input_with_n_nodes_equals_node_input() -> None:
    X, y = informative_nodes(30, 3, 4, 3, {0: 1.0}, seed=13)
    a = MultipleAggregationSVM().fit(X, y)
    b = MultipleAggregationSVM(n_nodes=3).fit(X.reshape(30, 12), y)
    np.testing.assert_array_equal(a.beta_, b.beta_)
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X.reshape(30, 12)))
    np.testing.assert_allclose(a.decision_function(X), b.decision_function(X))


def test_float32_and_float16_inputs_give_nearly_the_same_model() -> None:
    X, y = informative_nodes(40, 3, 6, 3, {2: 1.0}, seed=14)
    X16 = X.astype(np.float16)
    a = MultipleAggregationSVM(eps=1e-5).fit(X16.astype(np.float64), y)
    b = MultipleAggregationSVM(eps=1e-5).fit(X16.astype(np.float32), y)
    c = MultipleAggregationSVM(eps=1e-5).fit(X16, y)
    for other in (b, c):
        np.testing.assert_allclose(other.beta_, a.beta_, atol=2e-3)
        assert other.objective_ == pytest.approx(a.objective_, rel=1e-4)


def test_small_gram_budget_gives_the_same_model() -> None:
    """Without room for node Gram matrices the kernel is built from scaled node blocks."""
    X, y = informative_nodes(40, 7, 4, 3, {2: 1.0}, seed=15)
    cached = MultipleAggregationSVM().fit(X, y)
    streamed = MultipleAggregationSVM(gram_cache_gib=0.0).fit(X, y)
    np.testing.assert_allclose(streamed.beta_, cached.beta_, atol=1e-6)
    np.testing.assert_allclose(
        streamed.decision_function(X), cached.decision_function(X), rtol=1e-5, atol=1e-6
    )


def test_class_labels_are_kept() -> None:
    X, y = informative_nodes(30, 3, 4, 3, {0: 2.0}, seed=16)
    names = np.array(["run", "jump", "swim"])[y]
    est = MultipleAggregationSVM().fit(X, names)
    assert list(est.classes_) == ["jump", "run", "swim"]
    assert set(est.predict(X)) <= set(names)
    assert est.decision_function(X).shape == (30, 3)


# ---------------------------------------------------------------------------------- bad input
def test_one_class_is_an_error() -> None:
    X, _ = informative_nodes(10, 3, 4, 2, {}, seed=17)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MultipleAggregationSVM().fit(X, np.zeros(10))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_an_error(bad: float) -> None:
    X, y = informative_nodes(10, 3, 4, 2, {}, seed=18)
    X[3, 1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        MultipleAggregationSVM().fit(X, y)


def test_node_count_must_be_a_pyramid() -> None:
    X, y = informative_nodes(10, 4, 4, 2, {}, seed=19)
    with pytest.raises(ValueError, match="M=4 nodes"):
        MultipleAggregationSVM().fit(X, y)
    with pytest.raises(ValueError, match="do not split into 3 nodes"):
        MultipleAggregationSVM(n_nodes=3).fit(X.reshape(10, 16), y)
    with pytest.raises(ValueError, match="X has 4 nodes but n_nodes=3"):
        MultipleAggregationSVM(n_nodes=3).fit(X, y)


def test_wrong_dimensions_are_an_error() -> None:
    with pytest.raises(ValueError, match="4 dimensions"):
        MultipleAggregationSVM().fit(np.zeros((4, 3, 2, 2)), [0, 1, 0, 1])


def test_predict_with_other_nodes_or_features_is_an_error() -> None:
    X, y = informative_nodes(20, 3, 4, 2, {0: 1.0}, seed=20)
    est = MultipleAggregationSVM().fit(X, y)
    with pytest.raises(ValueError, match=r"7 nodes of 4 features, but .* fitted on 3 nodes of 4"):
        est.predict(np.zeros((2, 7, 4)))
    with pytest.raises(ValueError, match="3 nodes of 5 features"):
        est.decision_function(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="expecting 12 features"):
        est.predict(np.zeros((2, 11)))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"C": -1.0}, r"'C' parameter .* must be a float in the range \(0(\.0)?, inf\)"),
        ({"C": math.inf}, r"'C' parameter .* Got inf"),
        ({"eps": 0.0}, r"'eps' parameter .* Got 0.0"),
        ({"tol": math.nan}, r"'tol' parameter .* Got nan"),
        ({"variant": "sum"}, r"'variant' parameter .* must be a str among .*'concat'"),
        ({"kernel": "poly"}, r"'kernel' parameter .* must be a str among .*'chi2'"),
        ({"variant": "average", "kernel": "rbf"}, "defined for variant='concat' only"),
        ({"beta_step": "newton"}, r"'beta_step' parameter .* must be a str among"),
        ({"level": 1.5}, r"'level' parameter .* range \(0(\.0)?, 1(\.0)?\)"),
        ({"max_iter": 0}, r"'max_iter' parameter .* must be an int in the range \[1, inf\)"),
        ({"max_iter": 2.5}, r"'max_iter' parameter .* Got 2.5"),
        ({"restarts": 0}, r"'restarts' parameter"),
        ({"gamma": "auto"}, r"'gamma' parameter .* must be a str among \{'scale'\} or a float"),
        ({"gamma_scale": -2.0}, r"'gamma_scale' parameter"),
        ({"n_nodes": 0}, r"'n_nodes' parameter .* or None"),
        ({"gram_cache_gib": -1.0}, r"'gram_cache_gib' parameter"),
        ({"random_state": "seed"}, r"'random_state' parameter"),
    ],
)
def test_bad_parameters_are_named(params: dict, match: str) -> None:
    """scikit-learn's parameter validation names the parameter, what it must be and the value,
    before any work; the combination rule is checked by the estimator itself."""
    X, y = informative_nodes(10, 3, 4, 2, {}, seed=21)
    est = MultipleAggregationSVM(**params)
    with pytest.raises(ValueError, match=match):
        est.fit(X, y)
    with pytest.raises(ValueError, match=match):
        est.check_params()
    assert not hasattr(est, "classes_")


def test_parameters_are_validated_by_scikit_learn_constraints() -> None:
    from sklearn.utils._param_validation import InvalidParameterError

    constraints = MultipleAggregationSVM._parameter_constraints
    assert set(constraints) == set(MultipleAggregationSVM().get_params())
    with pytest.raises(InvalidParameterError):
        MultipleAggregationSVM(C=0.0).fit(*informative_nodes(10, 3, 4, 2, {}, seed=21))


def test_stopping_at_max_iter_warns_convergence() -> None:
    """Both variants warn with ConvergenceWarning when max_iter stops them above eps, and not
    when they reach eps."""
    X, y = informative_nodes(40, 7, 4, 3, {5: 2.0, 6: 1.0}, seed=24)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=1 with relative gap .* above eps"):
        est = MultipleAggregationSVM(max_iter=1, eps=1e-9).fit(X, y)
    assert est.n_iter_ == 1 and est.gap_ > 1e-9
    with pytest.warns(ConvergenceWarning, match="relative Frank-Wolfe gap"):
        MultipleAggregationSVM(variant="average", max_iter=1, restarts=1, eps=1e-9).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = MultipleAggregationSVM(max_iter=200, eps=1e-3).fit(X, y)
        assert est.gap_ <= 1e-3
        MultipleAggregationSVM(max_iter=1).fit(X[:, :1], y)  # one node: nothing to iterate


def test_chi2_needs_non_negative_features() -> None:
    X, y = informative_nodes(10, 3, 4, 2, {}, seed=22)
    with pytest.raises(ValueError, match="non-negative"):
        MultipleAggregationSVM(kernel="chi2").fit(X, y)


def test_nonlinear_kernel_over_the_memory_budget_is_an_error() -> None:
    X, y = informative_nodes(40, 7, 4, 2, {}, seed=23)
    with pytest.raises(ValueError, match="needs all 7 node Gram matrices"):
        MultipleAggregationSVM(kernel="rbf", gram_cache_gib=1e-5).fit(X, y)


def test_packed_triangles_round_trip() -> None:
    A = np.random.default_rng(24).normal(size=(700, 9))
    K = A @ A.T
    np.testing.assert_array_equal(unpack_upper(pack_upper(K), np.empty_like(K), block=128), K)


@pytest.mark.parametrize("room", [0, 2, 100])
def test_combined_kernel_equals_the_weighted_sum_at_any_budget(room: int) -> None:
    X = np.random.default_rng(25).normal(size=(60, 7, 5))
    grams = NodeGrams(X, kernel="linear", gammas=None, budget_bytes=room * 60 * 61 / 2 * 8)
    for seed in range(3):  # several betas: cache hits, misses and evictions
        beta = np.random.default_rng(seed).dirichlet(np.ones(7))
        beta[seed] = 0.0
        expected = sum(b * X[:, m] @ X[:, m].T for m, b in enumerate(beta))
        np.testing.assert_allclose(grams.combined(beta), expected, rtol=1e-12, atol=1e-12)
    assert len(grams.cached) == min(room, 7)


def test_classes_in_worker_processes_give_the_same_svms() -> None:
    X, y = informative_nodes(40, 3, 4, 4, {1: 1.0}, seed=26)
    Y = ovr_targets(y, 4)
    K = concat_kernel(X, np.full(3, 1 / 3))
    one = alpha_step(K, Y, C=1.0, tol=1e-4)
    two = alpha_step(K, Y, C=1.0, tol=1e-4, n_jobs=2)
    np.testing.assert_array_equal(one.U, two.U)
    np.testing.assert_array_equal(one.b, two.b)
