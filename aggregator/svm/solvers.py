"""Numerical building blocks of the multiple-aggregation SVM (the multiple aggregation paper,
section 3.1).

Notation: ``X [n, M, d]`` node features Psi_m, ``beta [M]`` on the simplex, ``Y [n, L]`` one-vs-rest
targets in {-1, +1} (L = 1 for two classes, L = C otherwise), ``U [n, L]`` the dual vectors
u_l = alpha_l * y_l of the L soft-margin SVMs.

- :class:`NodeGrams` builds the combined kernel ``K_beta = sum_m beta_m K_m`` and the cut
  coefficients ``S[l, m] = 1/2 u_l' K_m u_l``. For the linear kernel neither needs all M node Gram
  matrices at once: ``S`` comes from the ``d``-dim projections ``Psi_m' U`` and node Grams are kept
  only within a memory budget (least recently used first out).
- :func:`alpha_step` solves the L SVM duals on a precomputed kernel with libsvm.
- :func:`cutting_plane_lp` is the beta-step of the concatenation variant (an LP in cvxpy).
- :func:`project_simplex` is the Euclidean projection used by the averaging variant.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import sklearn
from joblib import Parallel, delayed
from scipy import sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics.pairwise import additive_chi2_kernel
from sklearn.svm import SVC

from aggregator.svm.kernels import KERNELS, node_kernel
from aggregator.svm.notes import counted_solve, swallow_highs_banner

log = logging.getLogger(__name__)

_CHUNK_BYTES = 512 << 20  # scaled node blocks multiplied at once when a Gram is not cached
# svm_max_iter="auto": libsvm iterations per SVM, at least SVM_ITER_PER_SAMPLE per training sample
# and at least SVM_WORK_MIN / n (an iteration costs O(n): small problems get as much work as a
# solve of a fraction of a second, which some need at a large C; PLAID's 537 videos need ~300k)
SVM_ITER_PER_SAMPLE = 100
SVM_WORK_MIN = 200_000_000


# --------------------------------------------------------------------------- targets
def ovr_targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n, L]`` float64 targets in {-1, +1}: one column per class, or one column (class 1
    positive) for two classes, as scikit-learn's binary classifiers do."""
    if n_classes == 2:
        return np.where(y == 1, 1.0, -1.0)[:, None]
    return np.where(y[:, None] == np.arange(n_classes)[None, :], 1.0, -1.0)


# --------------------------------------------------------------------------- alpha-step
@dataclass
class AlphaStep:
    """The L SVMs trained on one kernel: ``U [n, L]`` (alpha∘y), intercepts ``b [L]``, and how
    many of them libsvm stopped at its iteration bound (``at_bound``; their ``alpha`` is feasible
    but not optimal)."""

    U: np.ndarray
    b: np.ndarray
    at_bound: int = 0

    @property
    def a(self) -> np.ndarray:
        """``[L]`` the linear part of each dual objective, ``1'alpha_l = sum |u_l|``."""
        return np.abs(self.U).sum(axis=0)


def _fit_columns(
    K: np.ndarray,
    Y: np.ndarray,
    cols: np.ndarray,
    C: float,
    tol: float,
    cache_size: float,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    n = K.shape[0]
    U = np.zeros((n, len(cols)))
    b = np.zeros(len(cols))
    at_bound = 0
    # K is checked once by the caller; scikit-learn would rescan all n^2 entries for every class.
    with sklearn.config_context(assume_finite=True), warnings.catch_warnings():
        # a solve stopped at max_iter is counted and reported once by the caller
        warnings.filterwarnings("ignore", "Solver terminated early", ConvergenceWarning)
        for j, col in enumerate(cols):
            svc = SVC(kernel="precomputed", C=C, tol=tol, cache_size=cache_size, max_iter=max_iter)
            svc.fit(K, Y[:, col])
            U[svc.support_, j] = svc.dual_coef_[0]  # alpha_i y_i, positive for y_i = +1
            b[j] = svc.intercept_[0]
            at_bound += int(max_iter > 0 and int(svc.n_iter_[0]) >= max_iter)
    return U, b, at_bound


def libsvm_iterations(n: int, max_iter: int | str | None) -> int:
    """libsvm's iteration bound per SVM on ``n`` samples for an estimator's ``svm_max_iter``:
    ``"auto"`` is :data:`SVM_ITER_PER_SAMPLE` times ``n`` or :data:`SVM_WORK_MIN` over ``n``,
    whichever is larger; None is no bound (-1, libsvm's own convention); an integer is itself."""
    if max_iter is None:
        return -1
    if max_iter == "auto":
        return max(SVM_ITER_PER_SAMPLE * n, -(-SVM_WORK_MIN // max(n, 1)))
    if isinstance(max_iter, str):
        raise ValueError(
            f"svm_max_iter must be 'auto', None or a positive integer, got {max_iter!r}"
        )
    if max_iter < 1:
        raise ValueError(f"svm_max_iter must be positive, got {max_iter}")
    return int(max_iter)


def alpha_step(
    K: np.ndarray,
    Y: np.ndarray,
    *,
    C: float,
    tol: float,
    n_jobs: int | None = None,
    cache_size: float = 200.0,
    max_iter: int = -1,
) -> AlphaStep:
    """Solve ``max_alpha 1'alpha - 1/2 (alpha∘y)' K (alpha∘y)``, ``0 <= alpha <= C``,
    ``y'alpha = 0`` for every column of ``Y`` with libsvm on the precomputed ``K [n, n]``.

    ``max_iter`` bounds libsvm's iterations per SVM (-1: none). On a hard, non-separable problem
    at a large ``C`` libsvm can take tens of millions of iterations of O(n) each; one stopped at
    the bound keeps a feasible ``alpha`` (so its dual objective is still a valid cut) and is
    counted in ``AlphaStep.at_bound``.

    ``n_jobs > 1`` fits groups of columns in worker processes (libsvm holds the GIL, so threads do
    not help); each call ships ``K`` to the workers through a memory map, which pays only when
    the SVMs take longer than writing ``K`` (about 1 s at n = 9,500).
    """
    K = np.ascontiguousarray(K, dtype=np.float64)
    if not np.isfinite(K).all():
        raise ValueError("the combined kernel matrix contains NaN or infinity")
    n_cols = Y.shape[1]
    jobs = 1 if n_jobs is None else int(n_jobs)
    if jobs < 0:
        jobs = max(1, (os.cpu_count() or 1) + 1 + jobs)
    if jobs <= 1 or n_cols == 1:
        U, b, at_bound = _fit_columns(K, Y, np.arange(n_cols), C, tol, cache_size, max_iter)
        return AlphaStep(U, b, at_bound)
    groups = [g for g in np.array_split(np.arange(n_cols), min(jobs, n_cols)) if len(g)]
    parts = Parallel(n_jobs=jobs)(
        delayed(_fit_columns)(K, Y, g, C, tol, cache_size, max_iter) for g in groups
    )
    U = np.concatenate([p[0] for p in parts], axis=1)
    b = np.concatenate([p[1] for p in parts])
    return AlphaStep(U, b, sum(p[2] for p in parts))


def dual_values(K: np.ndarray, step: AlphaStep) -> np.ndarray:
    """``[L]`` dual objectives ``sum |u_l| - 1/2 u_l' K u_l`` (direct, O(n^2 L); for tests)."""
    return step.a - 0.5 * np.einsum("il,il->l", step.U, K @ step.U)


# --------------------------------------------------------------------------- kernels
def scale_gammas(X: np.ndarray, kernel: str) -> np.ndarray:
    """``[M]`` per-node gamma = 1 / mean pairwise distance of the node's rows.

    The distance is the squared Euclidean one for ``rbf`` (closed form, O(n d)) and the chi2 one,
    ``sum_k (x_k - y_k)^2 / (x_k + y_k)``, for ``chi2`` (O(n^2 d)).
    """
    n, m_nodes, _ = X.shape
    out = np.empty(m_nodes)
    for m in range(m_nodes):
        P = np.asarray(X[:, m, :], dtype=np.float64)
        if kernel == "rbf":
            # mean over ordered pairs of ||x_i - x_j||^2 = 2 (mean ||x||^2 - ||mean x||^2)
            mean_dist = 2.0 * ((P * P).sum(1).mean() - (P.mean(0) ** 2).sum())
            mean_dist *= n / max(n - 1, 1)  # exclude the zero diagonal
        elif kernel == "chi2":
            D = -additive_chi2_kernel(P)
            mean_dist = D.sum() / max(n * (n - 1), 1)
        else:
            raise ValueError(f"gamma applies to the rbf and chi2 kernels, not {kernel!r}")
        out[m] = 1.0 / mean_dist if mean_dist > 0 else 1.0
    return out


def work_dtype(dtype: np.dtype) -> np.dtype:
    """Arithmetic dtype of node features stored as ``dtype``: float64 stays, others float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def node_blocks(
    X: np.ndarray, nodes: list[int], max_bytes: int = _CHUNK_BYTES
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield ``(node indices, [n, k*d] block)`` of ``X [n, M, d]`` in the arithmetic dtype, a few
    nodes at a time so that float16 features are widened one block at a time."""
    n, _, dim = X.shape
    dtype = work_dtype(X.dtype)
    per_block = max(1, int(max_bytes // max(1, n * dim * dtype.itemsize)))
    for start in range(0, len(nodes), per_block):
        idx = nodes[start : start + per_block]
        if idx == list(range(idx[0], idx[-1] + 1)):
            block = X[:, idx[0] : idx[-1] + 1, :].reshape(n, len(idx) * dim)  # a view
        else:
            block = X[:, idx, :].reshape(n, len(idx) * dim)
        yield idx, np.asarray(block, dtype=dtype)


def pack_upper(K: np.ndarray) -> np.ndarray:
    """The upper triangle of a symmetric ``[n, n]`` matrix, row by row (``n (n + 1) / 2``)."""
    n = K.shape[0]
    out = np.empty(n * (n + 1) // 2, dtype=K.dtype)
    start = 0
    for i in range(n):
        out[start : start + n - i] = K[i, i:]
        start += n - i
    return out


def unpack_upper(packed: np.ndarray, out: np.ndarray, block: int = 256) -> np.ndarray:
    """Fill the symmetric ``out [n, n]`` from :func:`pack_upper`'s layout (any dtype cast)."""
    n = out.shape[0]
    start = 0
    for i in range(n):
        out[i, i:] = packed[start : start + n - i]
        start += n - i
    for r0 in range(0, n, block):  # mirror the upper triangle tile by tile
        r1 = min(n, r0 + block)
        tile = out[r0:r1, r0:r1]
        lower = np.tril_indices(r1 - r0, -1)
        tile[lower] = tile.T[lower]
        for c0 in range(r1, n, block):
            c1 = min(n, c0 + block)
            out[c0:c1, r0:r1] = out[r0:r1, c0:c1].T
    return out


class NodeGrams:
    """Node Gram matrices ``K_m = kappa(Psi_m, Psi_m)`` computed on demand within a memory budget.

    Linear-kernel Gram matrices are kept as packed upper triangles (half the memory), as many as
    the budget holds, the nodes with the largest current beta first (heavy nodes tend to stay in
    use from one iterate to the next). One that does not fit is never stored: the combined kernel
    then takes a product of the blocks ``sqrt(beta_m) Psi_m`` instead, and the cut coefficients
    come from ``Psi_m' U``, so memory stays at O(n^2 + n M d) whatever M is. Non-linear kernels
    have no such shortcut and need all M matrices (kept whole, in float64); the constructor raises
    when they do not fit.
    ``n_computed`` counts the node Gram matrices computed so far (cache misses).
    """

    def __init__(
        self,
        X: np.ndarray,
        *,
        kernel: str,
        gammas: np.ndarray | None,
        budget_bytes: float,
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.X = X
        self.kernel = kernel
        self.gammas = gammas
        self.n, self.n_nodes, self.dim = X.shape
        self.packed = kernel == "linear"
        self.dtype = work_dtype(X.dtype) if self.packed else np.dtype(np.float64)
        entries = self.n * (self.n + 1) // 2 if self.packed else self.n * self.n
        self.gram_bytes = entries * self.dtype.itemsize
        self.capacity = int(budget_bytes // self.gram_bytes) if self.gram_bytes else 0
        self.n_computed = 0
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._out: np.ndarray | None = None  # the combined kernel, reused from call to call
        if not self.packed:
            if self.capacity < self.n_nodes:
                need = self.n_nodes * self.gram_bytes / 2**30
                raise ValueError(
                    f"kernel={kernel!r} needs all {self.n_nodes} node Gram matrices "
                    f"({need:.2f} GiB for n={self.n}), more than the budget of "
                    f"{budget_bytes / 2**30:.2f} GiB; use kernel='linear', fewer levels or "
                    "videos, or raise gram_cache_gib"
                )
            for m in range(self.n_nodes):
                self._cache[m] = self._compute(m)

    @property
    def cached(self) -> list[int]:
        return list(self._cache)

    def _compute(self, m: int) -> np.ndarray:
        self.n_computed += 1
        if self.kernel == "linear":
            P = np.asarray(self.X[:, m, :], dtype=self.dtype)
            return P @ P.T  # a symmetric rank-d update (BLAS syrk)
        assert self.gammas is not None
        P = np.asarray(self.X[:, m, :], dtype=np.float64)
        return node_kernel(P, P, self.kernel, float(self.gammas[m]))

    def _make_room(self, weight: np.ndarray, candidate: int) -> bool:
        """Free a slot for ``candidate`` by evicting cached nodes that weigh less in the current
        beta (unused ones first, least recently used first among equals); False if none does."""
        if self.capacity == 0:
            return False
        while len(self._cache) >= self.capacity:
            victim = min(self._cache, key=lambda m: weight[m])  # ties: least recently used
            if weight[victim] >= weight[candidate]:
                return False
            del self._cache[victim]
        return True

    def combined(self, beta: np.ndarray) -> np.ndarray:
        """``[n, n]`` float64 ``K_beta = sum_m beta_m K_m`` over the nodes with ``beta_m > 0``.

        The linear kernel's result lives in a buffer that the next call overwrites.
        """
        active = [int(m) for m in np.flatnonzero(beta > 0)]
        shape = (self.n * (self.n + 1) // 2,) if self.packed else (self.n, self.n)
        acc = np.zeros(shape, dtype=self.dtype if self.packed else np.float64)
        tmp = np.empty(shape, dtype=self.dtype)
        missing = []
        for m in active:
            if m in self._cache:
                self._cache.move_to_end(m)
                np.multiply(self._cache[m], beta[m], out=tmp)
                acc += tmp
            else:
                missing.append(m)
        rest = []
        for m in sorted(missing, key=lambda m: -beta[m]):  # the heaviest nodes get the room
            if self._make_room(beta, m):
                Km = self._compute(m)
                self._cache[m] = pack_upper(Km) if self.packed else Km
                del Km
                np.multiply(self._cache[m], beta[m], out=tmp)
                acc += tmp
            else:
                rest.append(m)
        del tmp
        if not self.packed:
            return acc
        if self._out is None:
            self._out = np.empty((self.n, self.n), dtype=np.float64)
        K = unpack_upper(acc, self._out)
        del acc
        # nodes left out of the cache: blocks [sqrt(beta_m) Psi_m], one product each
        for idx, block in node_blocks(self.X, rest):
            self.n_computed += len(idx)
            scale = np.repeat(np.sqrt(beta[idx]), self.dim).astype(block.dtype)
            if np.shares_memory(block, self.X):
                block = block * scale
            else:
                block *= scale
            K += block @ block.T
        return K

    def projections(self, U: np.ndarray) -> np.ndarray:
        """``[M, d, L]`` float64 ``Psi_m' U`` (linear kernel only)."""
        if self.kernel != "linear":
            raise ValueError("node projections exist only for the linear kernel")
        return node_projections(self.X, U)

    def cut_coefficients(self, U: np.ndarray, P: np.ndarray | None = None) -> np.ndarray:
        """``[L, M]`` ``S[l, m] = 1/2 u_l' K_m u_l``; for the linear kernel from ``P = Psi' U``."""
        if self.kernel == "linear":
            if P is None:
                P = self.projections(U)
            return 0.5 * np.einsum("mdl,mdl->lm", P, P)
        S = np.empty((U.shape[1], self.n_nodes))
        for m in range(self.n_nodes):
            S[:, m] = 0.5 * np.einsum("il,il->l", U, self._cache[m] @ U)
        return S


# --------------------------------------------------------------------------- beta-steps
class SolveError(RuntimeError):
    """A cvxpy problem ended without a usable solution; ``status`` is cvxpy's status."""

    def __init__(self, what: str, status: str | None) -> None:
        super().__init__(f"{what} did not solve: status {status!r}")
        self.status = str(status)


def _lp_solver() -> str:
    installed = cp.installed_solvers()
    for name in ("HIGHS", "CLARABEL", "ECOS", "SCS"):
        if name in installed:
            if name == "HIGHS":
                swallow_highs_banner()
            return name
    raise RuntimeError(f"no LP solver available to cvxpy (installed: {installed})")


def _cut_model(
    a: np.ndarray, S: np.ndarray, owner: np.ndarray, n_classifiers: int
) -> tuple[cp.Variable, cp.Variable, list[cp.Constraint]]:
    """Variables ``beta`` (on the simplex) and ``t >= 0`` with every cut
    ``t_owner[k] >= a[k] - S[k] . beta``: the model shared by both beta-steps."""
    n_cuts, m_nodes = S.shape
    beta = cp.Variable(m_nodes, nonneg=True)
    t = cp.Variable(n_classifiers, nonneg=True)
    owner_matrix = sparse.csr_matrix(
        (np.ones(n_cuts), (np.arange(n_cuts), owner)), shape=(n_cuts, n_classifiers)
    )
    return beta, t, [cp.sum(beta) == 1, owner_matrix @ t + S @ beta >= a]


def cutting_plane_lp(
    a: np.ndarray, S: np.ndarray, owner: np.ndarray, n_classifiers: int
) -> tuple[np.ndarray, float]:
    """The beta-step: ``min sum_l t_l`` over ``beta`` on the simplex and ``t >= 0`` subject to
    ``t_owner[k] >= a[k] - S[k] . beta`` for every accumulated cut ``k``.

    Each cut is the dual objective of a trained SVM, which lower-bounds that classifier's
    optimum at every beta; ``t >= 0`` is the cut of alpha = 0. Returns ``(beta, LP optimum)``.
    """
    beta, t, cuts = _cut_model(a, S, owner, n_classifiers)
    problem = cp.Problem(
        cp.Minimize(cp.sum(t)),
        cuts,
    )
    solver = _lp_solver()
    counted_solve(lambda: problem.solve(solver=solver), lambda: problem.status)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or beta.value is None:
        raise SolveError("the beta LP", problem.status)
    return np.asarray(beta.value, dtype=np.float64), float(problem.value)


def level_projection(
    a: np.ndarray,
    S: np.ndarray,
    owner: np.ndarray,
    n_classifiers: int,
    center: np.ndarray,
    level: float,
) -> np.ndarray:
    """The level-method beta-step: the point of ``{beta on the simplex : model(beta) <= level}``
    closest to ``center``, where ``model(beta) = sum_l max(0, max_k owned by l (a[k] - S[k].beta))``
    is the same cut model as :func:`cutting_plane_lp` (a QP in cvxpy)."""
    beta, t, cuts = _cut_model(a, S, owner, n_classifiers)
    problem = cp.Problem(
        cp.Minimize(cp.sum_squares(beta - center)),
        [*cuts, cp.sum(t) <= level],
    )
    solver = "CLARABEL" if "CLARABEL" in cp.installed_solvers() else None
    counted_solve(lambda: problem.solve(solver=solver), lambda: problem.status)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or beta.value is None:
        raise SolveError("the level projection", problem.status)
    return np.asarray(beta.value, dtype=np.float64)


def clean_simplex(beta: np.ndarray, threshold: float = 1e-7) -> np.ndarray:
    """Zero the entries below ``threshold`` (solver noise) and renormalise to sum 1."""
    out = np.where(beta > threshold, beta, 0.0)
    total = out.sum()
    if total <= 0:
        raise ValueError(f"beta has no entry above {threshold}: {beta!r}")
    return out / total


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{beta >= 0, sum beta = 1}`` (sort-based, O(M log M))."""
    v = np.asarray(v, dtype=np.float64)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def average_features(X: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``[n, d]`` ``X_beta = sum_m beta_m Psi_m`` (the averaging map), in the arithmetic dtype."""
    n, _, dim = X.shape
    out = np.zeros((n, dim), dtype=work_dtype(X.dtype))
    active = [int(m) for m in np.flatnonzero(beta)]
    for idx, block in node_blocks(X, active):
        out += np.einsum("nkd,k->nd", block.reshape(n, len(idx), dim), beta[idx].astype(out.dtype))
    return out


def node_projections(X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """``[M, d, L]`` float64 ``Psi_m' U`` for every node of ``X [n, M, d]``."""
    _, m_nodes, dim = X.shape
    P = np.empty((m_nodes, dim, U.shape[1]))
    Uw = U.astype(work_dtype(X.dtype))
    for idx, block in node_blocks(X, list(range(m_nodes))):
        P[idx] = (block.T @ Uw).reshape(len(idx), dim, -1)
    return P


def average_objective(
    X: np.ndarray,
    beta: np.ndarray,
    Y: np.ndarray,
    *,
    C: float,
    tol: float,
    n_jobs: int | None = None,
    max_iter: int = -1,
) -> tuple[float, np.ndarray, AlphaStep, np.ndarray]:
    """J(beta) of the averaging map, its gradient, the SVMs and ``W = X_beta' U [d, L]``
    (``max_iter``: libsvm's bound per SVM, see :func:`alpha_step`).

    ``J = sum_l [sum |u_l| - 1/2 ||X_beta' u_l||^2]`` at the SVM optimum; by Danskin's theorem
    ``dJ/dbeta_m = -sum_l (Psi_m' u_l) . (X_beta' u_l)``.
    """
    Xb = average_features(X, beta)  # [n, d]
    K = np.asarray(Xb @ Xb.T, dtype=np.float64)
    step = alpha_step(K, Y, C=C, tol=tol, n_jobs=n_jobs, max_iter=max_iter)
    del K
    W = np.asarray(Xb.T @ step.U.astype(Xb.dtype), dtype=np.float64)  # [d, L]
    P = node_projections(X, step.U)  # [M, d, L]
    J = float(step.a.sum() - 0.5 * (W * W).sum())
    grad = -np.einsum("mdl,dl->m", P, W)
    return J, grad, step, W
