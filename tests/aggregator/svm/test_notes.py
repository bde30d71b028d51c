"""Solver reports are counted where a block collects them and shown once, never per solve."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest

from aggregator.svm import MultipleAggregationSVM
from aggregator.svm import notes as solver_notes
from aggregator.svm.solvers import cutting_plane_lp


def _inaccurate_solve() -> str:
    warnings.warn(
        "Solution may be inaccurate. Try another solver, adjusting the solver settings, or solve "
        "with verbose=True for more information.",
        UserWarning,
        stacklevel=2,
    )
    return "solved"


def test_inaccurate_solves_and_fallbacks_are_counted_inside_a_block_and_summed_outward() -> None:
    with solver_notes.collecting() as outer:
        with warnings.catch_warnings(record=True) as shown, solver_notes.collecting() as inner:
            warnings.simplefilter("always")
            for _ in range(3):
                out = solver_notes.counted_solve(_inaccurate_solve, lambda: "optimal_inaccurate")
                assert out == "solved"
            solver_notes.counted_solve(lambda: None, lambda: "optimal")
            solver_notes.level_fallback("user_limit")
            solver_notes.level_fallback("user_limit")
        assert shown == []
        assert (inner.solves, inner.inaccurate) == (4, 3)
        assert inner.level_fallbacks == {"user_limit": 2}
    assert outer.as_dict() == {
        "solves": 4,
        "inaccurate": 3,
        "level_fallbacks": 2,
        "level_fallback_reasons": {"user_limit": 2},
    }
    line = outer.summary()
    assert "3 of 4" in line and "2 level projections" in line and "user_limit x2" in line
    assert "\n" not in line
    assert solver_notes.active() is None


def test_outside_a_block_a_solver_reports_as_it_would_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.warns(UserWarning, match="Solution may be inaccurate"):
        solver_notes.counted_solve(_inaccurate_solve, lambda: "optimal_inaccurate")
    with caplog.at_level(logging.WARNING):
        solver_notes.level_fallback("user_limit")
    assert "level projection failed (user_limit)" in caplog.text


def test_a_real_lp_solve_is_counted() -> None:
    a = np.array([1.0, 1.0])
    S = np.array([[1.0, 0.0], [0.0, 2.0]])
    with solver_notes.collecting() as notes:
        beta, lb = cutting_plane_lp(a, S, np.array([0, 1]), 2)
    assert notes.solves == 1
    # min over the simplex of max(0, 1 - b0) + max(0, 1 - 2 b1): 0.5 at b = (0.5, 0.5)
    np.testing.assert_allclose(lb, 0.5, atol=1e-6)
    np.testing.assert_allclose(beta, [0.5, 0.5], atol=1e-5)


def test_a_fit_outside_a_block_records_its_notes_and_warns_at_most_once() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 7, 5))
    y = np.arange(30) % 3
    X[:, 3, 0] += 3.0 * y  # one informative node
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        est = MultipleAggregationSVM(C=1.0, max_iter=8, random_state=0).fit(X, y)
    notes = est.solver_notes_
    assert notes["solves"] > 0
    ours = [w for w in shown if "MultipleAggregationSVM(C=1)" in str(w.message)]
    assert len(ours) == (1 if notes["inaccurate"] or notes["level_fallbacks"] else 0)
    assert not [w for w in shown if "Solution may be inaccurate" in str(w.message)]


def test_the_highs_banner_never_reaches_stdout() -> None:
    code = (
        "from aggregator.svm.notes import swallow_highs_banner\n"
        "swallow_highs_banner()\n"
        "import highspy\n"
        "highspy.Highs()\n"
        "print('only this')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout == "only this\n"
    assert "HiGHS" not in out.stderr
