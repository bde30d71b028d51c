"""The shallow multiple-aggregation kernel SVM (the multiple aggregation paper, section 3.1) as a
scikit-learn estimator.

One-vs-rest soft-margin SVMs over the C classes share one weight vector ``beta`` on the simplex over
the M = 2^D - 1 temporal-pyramid nodes. Training solves the multiple-kernel-learning saddle point

    min_beta J(beta),  J(beta) = sum_c max_{alpha in A_c} [1'alpha - 1/2 u_c' K_beta u_c],
    u_c = alpha∘y_c,  A_c = {0 <= alpha <= C, y_c'alpha = 0}

(the paper's Eq. 3 read as a min over alpha too would favour the least discriminative node).

- ``variant="concat"`` (map (*)): node m is scaled by sqrt(beta_m) and concatenated, so
  ``K_beta = sum_m beta_m K_m`` is linear in beta and J is convex. Each iteration runs an alpha-step
  (C SVMs by libsvm on the precomputed K_beta) whose dual objectives are cuts
  ``t_c >= a_c - S_c . beta`` lower-bounding J; the multi-cut LP over every cut gathered so far
  gives LB (its optimum), and J at the iterate gives UB. It stops when ``1 - LB / min UB <= eps``
  and returns the iterate with the best UB, whose SVMs were trained there. The next iterate is the
  LP's minimiser (``beta_step="lp"``, Kelley's cutting planes), or, by default
  (``beta_step="level"``, the level method), the point closest to the current beta whose cut model
  is below ``LB + level (UB - LB)``, a small QP: the same cuts and bounds, without the LP's jumps
  between simplex vertices (5-8 iterations to a gap of 1e-3 instead of 50-90 on 63 nodes).
- ``variant="average"`` (map (**)): ``X_beta = sum_m beta_m Psi_m`` and ``K = X_beta X_beta'`` is
  quadratic in beta; J is not convex. Projected gradient on the simplex with backtracking from
  ``restarts`` starting points (uniform, then random), stopping at a relative Frank-Wolfe gap of
  ``eps``; the best J wins. Only the linear kernel.

There is no ``predict_proba``: SVM scores are not probabilities. Calibrate them on held-out data
(``sklearn.calibration.CalibratedClassifierCV`` works on the 2-D input form), as
``aggregator.svm.calibration`` does with a softmax temperature.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from numbers import Integral, Real
from typing import Any, ClassVar

import cvxpy as cp
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from aggregator.svm import notes as solver_notes
from aggregator.svm.kernels import KERNELS, node_kernel
from aggregator.svm.notes import level_fallback
from aggregator.svm.solvers import (
    AlphaStep,
    NodeGrams,
    SolveError,
    alpha_step,
    average_objective,
    clean_simplex,
    cutting_plane_lp,
    level_projection,
    libsvm_iterations,
    node_blocks,
    ovr_targets,
    project_simplex,
    scale_gammas,
)

log = logging.getLogger(__name__)

VARIANTS = ("concat", "average")
BETA_STEPS = ("level", "lp")
_BACKTRACKS = 12  # step halvings before the averaging variant stops
_STALL = 1e-3  # ... or when a step gains less than this times eps, relatively
_FLOATS = [np.float64, np.float32, np.float16]


def _is_pyramid(m: int) -> bool:
    return m >= 1 and (m + 1) & m == 0


def _warn_not_converged(gap: str, est: MultipleAggregationSVM) -> None:
    warnings.warn(
        f"{type(est).__name__} stopped at max_iter={est.max_iter} with {gap} above "
        f"eps={est.eps:g}; increase max_iter or eps",
        ConvergenceWarning,
        stacklevel=5,  # the caller of fit (past _fit_context and _fit_concat/_average)
    )


class MultipleAggregationSVM(ClassifierMixin, BaseEstimator):
    """One-vs-rest SVMs sharing learned temporal-pyramid node weights ``beta``.

    Input ``X`` is node features ``[n, M, d]`` (``aggregator.intervals.node_means`` of each
    video, M = 2^D - 1 nodes in pyramid order), or the same flattened to ``[n, M*d]`` with
    ``n_nodes=M``. A 2-D ``X`` with ``n_nodes=None`` is one node: a plain SVM (so generic
    scikit-learn tools apply).

    Parameters:
        C: soft-margin penalty of every SVM.
        variant: ``"concat"`` (kernel linear in beta, convex) or ``"average"`` (quadratic).
        kernel: per-node kernel ``"linear"``, ``"rbf"`` or ``"chi2"`` (concat only). Non-linear
            kernels keep all M node Gram matrices (M n^2 doubles) and raise when they exceed
            ``gram_cache_gib``; the linear kernel never needs them all (see ``gram_cache_gib``).
        beta_step: ``"level"`` (level-set projection) or ``"lp"`` (the LP minimiser), concat only.
        level: where the level sits between LB (0) and UB (1) for ``beta_step="level"``.
        gamma: ``"scale"`` (per node, 1 / mean pairwise distance) or a float, for rbf/chi2.
        gamma_scale: factor on ``gamma`` (what the selection varies: a grid of factors of the
            per-node ``"scale"`` gammas keeps each node's own scale).
        n_nodes: number of nodes M when ``X`` is 2-D ``[n, M*d]``.
        max_iter: most alpha-steps (concat) or accepted gradient steps per restart (average).
        eps: stop at relative gap ``1 - LB/UB`` (concat) or relative Frank-Wolfe gap (average).
        tol: libsvm stopping tolerance; keep it <= 1e-4 for duals accurate to ~1e-6.
        svm_max_iter: libsvm's iteration bound per SVM: ``"auto"`` (100 per training sample,
            and at least 2e8 / n: an iteration costs O(n)), an integer, or None (no bound). On
            a hard, non-separable problem at a large ``C`` an unbounded libsvm can take tens of
            millions of O(n) iterations per SVM; a solve stopped at the bound keeps a feasible,
            not optimal, ``alpha``.
        restarts: starting points of the averaging variant (the first is uniform).
        gram_cache_gib: memory for the linear kernel's node Gram matrices kept between
            iterations (packed triangles, n^2/2 floats each); nodes beyond it are recomputed
            when beta uses them. 0 keeps none.
        n_jobs: worker processes fitting the classes of one alpha-step (pays when the SVMs take
            longer than shipping the n x n kernel to the workers).
        random_state: seeds the restarts of the averaging variant.

    Parameters are checked by scikit-learn's ``_parameter_constraints`` when ``fit`` starts (an
    ``InvalidParameterError``, a ``ValueError``); a fit that stops at ``max_iter`` before its gap
    reaches ``eps`` warns with ``ConvergenceWarning`` and keeps the best iterate; so does a fit in
    which libsvm stopped at ``svm_max_iter`` (once per fit, with the count).

    Fitted attributes: ``classes_``, ``beta_ [M]``, ``intercept_ [L]``, ``coef_ [L, M*d]`` (linear
    kernel: primal weights on the raw node features, zero where beta is zero) or
    ``support_``/``support_vectors_``/``dual_coef_``/``gammas_`` (rbf/chi2), ``objective_`` (J at
    ``beta_``), ``dual_values_ [L]``, ``gap_``, ``n_iter_`` (alpha-steps run), ``history_`` (one
    dict per iterate: iteration, lower, upper, gap, beta, seconds since fit began, svm_at_bound;
    concat also kernel_seconds, svm_seconds, beta_step_seconds, node_grams_computed; average
    also restart, with lower NaN), ``n_svm_at_bound_`` (SVM solves stopped at the bound over the
    whole fit), ``n_svm_solves_`` (all of them), ``svm_iter_bound_`` (the bound; -1: none),
    ``solver_notes_`` (cvxpy solves, those reported inaccurate, level projections that fell back
    to the LP minimiser; see :mod:`aggregator.svm.notes`: one warning per fit sums them up),
    ``n_nodes_``, ``n_node_features_``, ``n_features_in_``. L is 1 for two
    classes (positive = ``classes_[1]``) and C otherwise.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "variant": [StrOptions(set(VARIANTS))],
        "kernel": [StrOptions(set(KERNELS))],
        "beta_step": [StrOptions(set(BETA_STEPS))],
        "level": [Interval(Real, 0, 1, closed="neither")],
        "gamma": [StrOptions({"scale"}), Interval(Real, 0, None, closed="neither")],
        "gamma_scale": [Interval(Real, 0, None, closed="neither")],
        "n_nodes": [Interval(Integral, 1, None, closed="left"), None],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "eps": [Interval(Real, 0, None, closed="neither")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "svm_max_iter": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left"), None],
        "restarts": [Interval(Integral, 1, None, closed="left")],
        "gram_cache_gib": [Interval(Real, 0, None, closed="left")],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        C: float = 1.0,
        *,
        variant: str = "concat",
        kernel: str = "linear",
        beta_step: str = "level",
        level: float = 0.5,
        gamma: float | str = "scale",
        gamma_scale: float = 1.0,
        n_nodes: int | None = None,
        max_iter: int = 50,
        eps: float = 1e-3,
        tol: float = 1e-4,
        svm_max_iter: int | str | None = "auto",
        restarts: int = 3,
        gram_cache_gib: float = 4.0,
        n_jobs: int | None = None,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.C = C
        self.variant = variant
        self.kernel = kernel
        self.beta_step = beta_step
        self.level = level
        self.gamma = gamma
        self.gamma_scale = gamma_scale
        self.n_nodes = n_nodes
        self.max_iter = max_iter
        self.eps = eps
        self.tol = tol
        self.svm_max_iter = svm_max_iter
        self.restarts = restarts
        self.gram_cache_gib = gram_cache_gib
        self.n_jobs = n_jobs
        self.random_state = random_state

    # ------------------------------------------------------------------ validation
    def node_gammas(self, X: np.ndarray) -> np.ndarray | None:
        """``[M]`` per-node gammas of the kernel on node features ``X [n, M, d]`` (None for the
        linear kernel): ``gamma`` (``"scale"``: from ``X``) times ``gamma_scale``."""
        if self.kernel == "linear":
            return None
        if self.gamma == "scale":
            return scale_gammas(X, self.kernel) * float(self.gamma_scale)
        return np.full(X.shape[1], float(self.gamma) * float(self.gamma_scale))

    def check_params(self) -> None:
        """Raise on a bad parameter (``_parameter_constraints``) or a bad combination."""
        self._validate_params()
        self._check_combination()

    def _check_combination(self) -> None:
        if self.variant == "average" and self.kernel != "linear":
            raise ValueError(
                f"kernel={self.kernel!r} is a per-node kernel, defined for variant='concat' only; "
                "variant='average' uses the linear kernel"
            )

    def _validate(self, X: Any, y: Any = "no_validation", *, reset: bool) -> Any:
        """Return node features ``[n, M, d]`` (and y when given), checked against the fit."""
        name = type(self).__name__
        ndim = getattr(X, "ndim", None)
        if ndim is None:  # a list, or an object with __array__
            ndim = np.asarray(X).ndim
        if ndim > 3:
            raise ValueError(
                f"X must be node features [n, M, d] or flattened [n, M*d], got {ndim} dimensions"
            )
        if ndim == 3:
            arr = check_array(X, allow_nd=True, dtype=_FLOATS, input_name="X")
            n, m_nodes, dim = arr.shape
            if not reset and (m_nodes, dim) != (self.n_nodes_, self.n_node_features_):
                raise ValueError(
                    f"X has {m_nodes} nodes of {dim} features, but {name} was fitted on "
                    f"{self.n_nodes_} nodes of {self.n_node_features_} features"
                )
            if reset and self.n_nodes is not None and self.n_nodes != m_nodes:
                raise ValueError(f"X has {m_nodes} nodes but n_nodes={self.n_nodes}")
            X = arr.reshape(n, m_nodes * dim)
        else:
            m_nodes = (self.n_nodes or 1) if reset else self.n_nodes_
        no_y = isinstance(y, str) and y == "no_validation"
        if no_y:
            flat = validate_data(self, X, reset=reset, dtype=_FLOATS)
        else:  # y=None is refused here with scikit-learn's message
            flat, y = validate_data(self, X, y, reset=reset, dtype=_FLOATS)
        n_features = flat.shape[1]
        if n_features % m_nodes:
            raise ValueError(
                f"X has {n_features} features, which do not split into {m_nodes} nodes"
            )
        if not _is_pyramid(m_nodes):
            raise ValueError(
                f"X has M={m_nodes} nodes; a temporal pyramid of depth D has M = 2^D - 1 "
                "(1, 3, 7, 15, 31, 63, ...)"
            )
        nodes = flat.reshape(flat.shape[0], m_nodes, n_features // m_nodes)
        return nodes if no_y else (nodes, y)

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any, *, grams: NodeGrams | None = None) -> MultipleAggregationSVM:
        """Learn ``beta_`` and the SVMs. ``X [n, M, d]`` (or ``[n, M*d]``), ``y [n]`` labels.

        ``grams`` (concat variant) is a :class:`NodeGrams` of the same ``X`` and kernel to reuse,
        e.g. across values of ``C``: the node Gram matrices do not depend on ``C``.
        """
        self._check_combination()
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in y, got 1 class: "
                f"{classes.tolist()!r}"
            )
        if self.kernel == "chi2" and (X < 0).any():
            raise ValueError("kernel='chi2' needs non-negative features; X has negative values")
        self.classes_ = classes
        self.n_nodes_, self.n_node_features_ = X.shape[1], X.shape[2]
        Y = ovr_targets(y_idx, len(classes))
        self.svm_iter_bound_ = libsvm_iterations(X.shape[0], self.svm_max_iter)
        self.n_svm_at_bound_ = self.n_svm_solves_ = 0
        self.gammas_ = self.node_gammas(X)
        if grams is not None and (
            grams.X.shape != X.shape
            or grams.kernel != self.kernel
            or (
                self.kernel != "linear"
                and (
                    grams.gammas is None
                    or self.gammas_ is None
                    or not np.allclose(grams.gammas, self.gammas_)
                )
            )
        ):
            raise ValueError(
                f"grams of X {grams.X.shape} with kernel {grams.kernel!r} do not match X "
                f"{X.shape} with kernel {self.kernel!r} and these gammas"
            )
        nested = solver_notes.active() is not None
        with solver_notes.collecting() as notes:
            if self.variant == "concat":
                self._fit_concat(X, Y, grams)
            else:
                self._fit_average(X, Y)
        self.solver_notes_ = notes.as_dict()
        if notes and not nested:  # an enclosing block reports them itself
            warnings.warn(
                f"{type(self).__name__}(C={self.C:g}): {notes.summary()}", UserWarning, stacklevel=3
            )
        if self.n_svm_at_bound_:
            warnings.warn(
                f"{type(self).__name__}(C={self.C:g}) on n={X.shape[0]}: libsvm stopped at "
                f"svm_max_iter={self.svm_iter_bound_} iterations in {self.n_svm_at_bound_} of "
                f"{self.n_svm_solves_} SVM solves; their duals are feasible, not optimal. Raise "
                "svm_max_iter (None: no bound) for exact solves",
                ConvergenceWarning,
                stacklevel=3,  # the caller of fit (past _fit_context)
            )
        return self

    def _alpha_step(self, K: np.ndarray, Y: np.ndarray) -> AlphaStep:
        step = alpha_step(
            K,
            Y,
            C=float(self.C),
            tol=float(self.tol),
            n_jobs=self.n_jobs,
            max_iter=self.svm_iter_bound_,
        )
        self._count_solves(step, Y)
        return step

    def _count_solves(self, step: AlphaStep, Y: np.ndarray) -> None:
        self.n_svm_solves_ += Y.shape[1]
        self.n_svm_at_bound_ += step.at_bound

    def _fit_concat(self, X: np.ndarray, Y: np.ndarray, grams: NodeGrams | None = None) -> None:
        m_nodes = X.shape[1]
        if grams is None:
            grams = NodeGrams(
                X,
                kernel=self.kernel,
                gammas=self.gammas_,
                budget_bytes=self.gram_cache_gib * 2**30,
            )
        start = time.perf_counter()
        beta = np.full(m_nodes, 1.0 / m_nodes)
        cut_a: list[np.ndarray] = []
        cut_S: list[np.ndarray] = []
        history: list[dict[str, Any]] = []
        best_ub, lb_best = math.inf, -math.inf
        best: tuple[np.ndarray, AlphaStep, np.ndarray | None, np.ndarray] | None = None
        it = 0
        for it in range(1, self.max_iter + 1):
            t0, grams_before = time.perf_counter(), grams.n_computed
            K = grams.combined(beta)
            t1 = time.perf_counter()
            step = self._alpha_step(K, Y)
            del K
            t2 = time.perf_counter()
            P = grams.projections(step.U) if self.kernel == "linear" else None
            S = grams.cut_coefficients(step.U, P)  # [L, M]
            duals = step.a - S @ beta
            ub = float(duals.sum())
            if ub < best_ub:
                best_ub, best = ub, (beta.copy(), step, P, duals)
            cut_a.append(step.a)
            cut_S.append(S)
            if m_nodes == 1:
                beta_next, lb = beta, ub  # nothing to learn: J is known exactly
            else:
                beta_next, lb = self._beta_step(cut_a, cut_S, beta, best_ub)
            lb_best = max(lb_best, lb)
            gap = 1.0 - lb_best / best_ub if best_ub > 0 else 0.0
            t3 = time.perf_counter()
            history.append(
                {
                    "iteration": it,
                    "lower": lb,
                    "upper": ub,
                    "gap": gap,
                    "beta": beta.tolist(),
                    "seconds": t3 - start,
                    "kernel_seconds": t1 - t0,
                    "svm_seconds": t2 - t1,
                    "beta_step_seconds": t3 - t2,
                    "node_grams_computed": grams.n_computed - grams_before,
                    "svm_at_bound": step.at_bound,
                }
            )
            log.info(
                "svm iter %d: LB %.6g UB %.6g gap %.3g, %d active nodes, %.1f s",
                it,
                lb,
                ub,
                gap,
                int((beta > 0).sum()),
                history[-1]["seconds"],
            )
            if gap <= self.eps or m_nodes == 1:
                break
            beta = clean_simplex(beta_next)
        else:
            _warn_not_converged(f"relative gap 1 - LB/UB {history[-1]['gap']:.3g}", self)
        assert best is not None
        beta_best, step_best, P_best, duals_best = best
        self.history_ = history
        self.n_iter_ = it
        self.gap_ = history[-1]["gap"]
        self._store(X, beta_best, step_best, duals_best, P=P_best)

    def _beta_step(
        self, cut_a: list[np.ndarray], cut_S: list[np.ndarray], beta: np.ndarray, best_ub: float
    ) -> tuple[np.ndarray, float]:
        """The next iterate and the lower bound LB of the cuts so far (one per class per
        alpha-step): the LP minimiser, or its level-set projection from ``beta``."""
        n_cls = len(cut_a[0])
        owner = np.tile(np.arange(n_cls), len(cut_a))
        all_a, all_S = np.concatenate(cut_a), np.concatenate(cut_S)
        beta_next, lb = cutting_plane_lp(all_a, all_S, owner, n_cls)
        if self.beta_step == "level":
            level = lb + self.level * (best_ub - lb)
            try:
                beta_next = level_projection(all_a, all_S, owner, n_cls, beta, level)
            except SolveError as exc:
                level_fallback(exc.status)
            except (RuntimeError, cp.error.SolverError) as exc:
                level_fallback(f"{type(exc).__name__}: {exc}")
        return beta_next, lb

    def _fit_average(self, X: np.ndarray, Y: np.ndarray) -> None:
        m_nodes = X.shape[1]
        rng = check_random_state(self.random_state)
        starts = [np.full(m_nodes, 1.0 / m_nodes)]
        if m_nodes > 1:
            starts += [rng.dirichlet(np.ones(m_nodes)) for _ in range(self.restarts - 1)]
        kw: dict[str, Any] = {
            "C": float(self.C),
            "tol": float(self.tol),
            "n_jobs": self.n_jobs,
            "max_iter": self.svm_iter_bound_,
        }
        start = time.perf_counter()
        history: list[dict[str, Any]] = []
        evaluations = 0
        best: tuple[float, np.ndarray, AlphaStep, np.ndarray, float, bool] | None = None
        for restart, beta in enumerate(starts):
            J, g, step, W = average_objective(X, beta, Y, **kw)
            evaluations += 1
            self._count_solves(step, Y)
            spread = float(g.max() - g.min())
            eta = 1.0 / (m_nodes * spread) if spread > 0 else 1.0
            stalled = at_limit = False
            for it in range(1, self.max_iter + 1):
                fw_gap = float(g @ beta - g.min()) / J if J > 0 else 0.0
                at_limit = it == self.max_iter and fw_gap > self.eps and m_nodes > 1
                history.append(
                    {
                        "restart": restart,
                        "iteration": it,
                        "lower": math.nan,
                        "upper": J,
                        "gap": fw_gap,
                        "beta": beta.tolist(),
                        "seconds": time.perf_counter() - start,
                        "svm_at_bound": step.at_bound,
                    }
                )
                log.info("svm average restart %d iter %d: J %.6g gap %.3g", restart, it, J, fw_gap)
                if fw_gap <= self.eps or m_nodes == 1 or it == self.max_iter or stalled:
                    break
                moved = False
                for _ in range(_BACKTRACKS):  # backtracking on the projected-gradient step
                    cand = project_simplex(beta - eta * g)
                    delta = cand - beta
                    if np.abs(delta).max() < 1e-12:
                        break
                    Jc, gc, stepc, Wc = average_objective(X, cand, Y, **kw)
                    evaluations += 1
                    self._count_solves(stepc, Y)
                    if Jc <= J + g @ delta + (delta @ delta) / (2 * eta):
                        # J is not differentiable where the SVM duals are not unique; there the
                        # gradient is a subgradient and the steps shrink without closing the gap
                        stalled = J - Jc <= _STALL * self.eps * abs(J)
                        beta, J, g, step, W = cand, Jc, gc, stepc, Wc
                        eta *= 2.0
                        moved = True
                        break
                    eta /= 2.0
                if not moved:
                    break
            if best is None or best[0] > J:
                best = (J, beta, step, W, history[-1]["gap"], at_limit and not stalled)
        assert best is not None
        J, beta, step, W, gap, not_converged = best
        if not_converged:
            _warn_not_converged(f"relative Frank-Wolfe gap {gap:.3g}", self)
        self.history_ = history
        self.n_iter_ = evaluations
        self.gap_ = gap
        duals = step.a - 0.5 * (W * W).sum(axis=0)
        # X_beta . w_l = sum_m Psi_m . (beta_m w_l): primal weights on the raw nodes
        coef = np.einsum("m,dl->lmd", beta, W)
        self._store(X, beta, step, duals, coef=coef)

    def _store(
        self,
        X: np.ndarray,
        beta: np.ndarray,
        step: AlphaStep,
        duals: np.ndarray,
        *,
        P: np.ndarray | None = None,
        coef: np.ndarray | None = None,
    ) -> None:
        _, m_nodes, dim = X.shape
        self.beta_ = beta
        self.intercept_ = step.b
        self.dual_values_ = duals
        self.objective_ = float(duals.sum())
        if self.kernel == "linear":
            if coef is None:
                assert P is not None
                coef = np.einsum("m,mdl->lmd", beta, P)  # beta_m Psi_m' u_l
            self.coef_ = coef.reshape(coef.shape[0], m_nodes * dim)
        else:
            support = np.flatnonzero(np.abs(step.U).sum(axis=1) > 0)
            self.support_ = support
            self.support_vectors_ = X[support].copy()
            self.dual_coef_ = step.U[support].T.copy()  # [L, n_sv]

    # ------------------------------------------------------------------ predict
    def decision_function(self, X: Any) -> np.ndarray:
        """``[n, C]`` one-vs-rest scores (``[n]`` for two classes, positive = ``classes_[1]``)."""
        check_is_fitted(self)
        X = self._validate(X, reset=False)
        n = X.shape[0]
        if self.kernel == "linear":
            scores = np.zeros((n, self.coef_.shape[0]))
            coef = self.coef_.reshape(len(self.coef_), self.n_nodes_, -1)  # [L, M, d]
            active = [int(m) for m in np.flatnonzero(self.beta_ > 0)]
            for idx, block in node_blocks(X, active):
                w = coef[:, idx, :].reshape(len(coef), -1).astype(block.dtype)
                scores += block @ w.T
        else:
            gammas = self.gammas_
            assert gammas is not None
            scores = np.zeros((n, self.dual_coef_.shape[0]))
            for m in np.flatnonzero(self.beta_ > 0):
                Km = node_kernel(
                    X[:, m, :], self.support_vectors_[:, m, :], self.kernel, float(gammas[m])
                )
                scores += self.beta_[m] * (Km @ self.dual_coef_.T)
        scores += self.intercept_
        return scores[:, 0] if len(self.classes_) == 2 else scores

    def predict(self, X: Any) -> np.ndarray:
        """``[n]`` predicted class labels."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return self.classes_[(scores > 0).astype(np.int64)]
        return self.classes_[scores.argmax(axis=1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.input_tags.positive_only = self.kernel == "chi2"
        return tags
