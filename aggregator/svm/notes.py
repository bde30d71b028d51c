"""What the convex solvers said during a fit, counted instead of printed.

A run of the multiple-aggregation SVM makes hundreds of small cvxpy solves (the beta-step LPs and
level projections). cvxpy warns on every solve it reports as ``optimal_inaccurate`` (the iterate is
kept: the cuts stay valid lower bounds), a level projection that stops at the solver's iteration
limit falls back to the LP minimiser, and HiGHS prints a banner on the process's standard output
the first time it is constructed. None of that is worth a line per solve: the solvers record it in
the :class:`SolverNotes` of the innermost :func:`collecting` block, and whoever opened that block
reports it once (the estimator as one warning per fit, ``framepool train`` as one line and in
``metrics.json``).

Outside any :func:`collecting` block a solver reports as it would on its own (one warning per
inaccurate solve, one log line per fallback).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

INACCURATE_MESSAGE = "Solution may be inaccurate"  # the start of cvxpy's UserWarning


@dataclass
class SolverNotes:
    """Counts of what the solvers reported in one block (and the blocks nested in it)."""

    solves: int = 0  # cvxpy solves made
    inaccurate: int = 0  # ... that cvxpy reported as optimal_inaccurate (result kept)
    level_fallbacks: Counter[str] = field(default_factory=Counter)  # reason -> count

    def __bool__(self) -> bool:
        return bool(self.inaccurate or self.level_fallbacks)

    def merge(self, other: SolverNotes) -> None:
        self.solves += other.solves
        self.inaccurate += other.inaccurate
        self.level_fallbacks.update(other.level_fallbacks)

    def as_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready values (``metrics.json``'s ``solver_notes``)."""
        return {
            "solves": self.solves,
            "inaccurate": self.inaccurate,
            "level_fallbacks": sum(self.level_fallbacks.values()),
            "level_fallback_reasons": dict(sorted(self.level_fallbacks.items())),
        }

    def summary(self) -> str:
        """One line saying what was reported, or ``""`` when nothing was."""
        parts = []
        if self.inaccurate:
            parts.append(
                f"{self.inaccurate} of {self.solves} beta-step solves ended "
                "'optimal_inaccurate' in cvxpy (their results used)"
            )
        n_fallbacks = sum(self.level_fallbacks.values())
        if n_fallbacks:
            why = ", ".join(f"{r} x{n}" for r, n in sorted(self.level_fallbacks.items()))
            parts.append(
                f"{n_fallbacks} level projections did not solve and took the LP minimiser ({why})"
            )
        return "; ".join(parts)


_ACTIVE: ContextVar[SolverNotes | None] = ContextVar("framepool_svm_solver_notes", default=None)


def active() -> SolverNotes | None:
    """The notes of the innermost :func:`collecting` block of this thread, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def collecting() -> Iterator[SolverNotes]:
    """Record solver reports in new notes for the duration of the block; they are added to the
    enclosing block's notes when it ends."""
    outer = _ACTIVE.get()
    notes = SolverNotes()
    token = _ACTIVE.set(notes)
    try:
        yield notes
    finally:
        _ACTIVE.reset(token)
        if outer is not None:
            outer.merge(notes)


T = TypeVar("T")


def counted_solve(solve: Callable[[], T], status: Callable[[], str | None]) -> T:
    """Run ``solve`` (a ``problem.solve`` call) with cvxpy's inaccuracy warning counted in the
    active notes (``status()`` is read after the solve) instead of shown, when notes are active."""
    notes = _ACTIVE.get()
    if notes is None:
        return solve()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", INACCURATE_MESSAGE, UserWarning)
        out = solve()
    notes.solves += 1
    if status() is not None and str(status()).endswith("inaccurate"):
        notes.inaccurate += 1
    return out


def level_fallback(reason: str) -> None:
    """A level projection failed for ``reason`` and the LP minimiser is taken instead."""
    notes = _ACTIVE.get()
    if notes is None:
        log.warning("level projection failed (%s); taking the LP minimiser", reason)
    else:
        notes.level_fallbacks[reason] += 1


_banner_lock = threading.Lock()
_banner_done = False


def swallow_highs_banner() -> None:
    """Construct HiGHS once with the process's standard output (file descriptor 1) pointed at
    ``/dev/null``: HiGHS prints its banner from C++ on its first construction in a process, before
    any option (cvxpy's ``verbose=False`` included) can turn its output off."""
    global _banner_done
    with _banner_lock:
        if _banner_done:
            return
        _banner_done = True
        try:
            import highspy
        except ImportError:
            return
        with stdout_fd_to_devnull():
            highspy.Highs()


def _flush_c_stdio() -> None:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def stdout_fd_to_devnull() -> Iterator[None]:
    """Point file descriptor 1 at ``/dev/null`` for the block (what C libraries print there);
    Python's own ``sys.stdout`` is flushed first. A no-op where there is no file descriptor 1."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        _flush_c_stdio()  # what the C library buffered goes to /dev/null too
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
