"""PNG of the multiple-aggregation SVM's convergence: the bounds on J and the relative gap."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _value(v: Any) -> float:
    return math.nan if v is None else float(v)


def plot_convergence(
    histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = ""
) -> Path:
    """Lower and upper bounds of J (left) and the relative gap (right, log scale) per iteration.

    ``histories[stream]`` is ``MultipleAggregationSVM.history_``: dicts with ``lower`` (None or NaN
    when there is no bound, as for the averaging variant), ``upper`` and ``gap``; entries with a
    ``restart`` key are drawn one line per restart.
    """
    if not histories or not any(histories.values()):
        raise ValueError("no SVM history to plot")
    fig = Figure(figsize=(10, 3.6))
    ax_j, ax_gap = fig.subplots(1, 2)
    for stream, history in histories.items():
        runs: dict[int, list[Mapping[str, Any]]] = {}
        for h in history:
            runs.setdefault(int(h.get("restart", 0)), []).append(h)
        for restart, rows in runs.items():
            tag = stream if len(runs) == 1 else f"{stream} restart {restart}"
            its = [int(h["iteration"]) for h in rows]
            upper = [_value(h["upper"]) for h in rows]
            lower = [_value(h["lower"]) for h in rows]
            (line,) = ax_j.plot(its, upper, marker=".", label=f"{tag} UB (J at iterate)")
            if any(math.isfinite(v) for v in lower):
                ax_j.plot(its, lower, ls="--", color=line.get_color(), label=f"{tag} LB (LP)")
            gaps = [max(_value(h["gap"]), 1e-12) for h in rows]
            ax_gap.semilogy(its, gaps, marker=".", color=line.get_color(), label=tag)
    ax_j.set(xlabel="iteration", ylabel="J(beta)", title="bounds on the SVM objective")
    ax_gap.set(
        xlabel="iteration",
        ylabel="relative gap",
        title="gap (concat: 1 - LB / min UB; average: Frank-Wolfe)",
    )
    ax_j.legend(fontsize=7)
    ax_gap.legend(fontsize=7)
    what = "SVM convergence"
    fig.suptitle(f"{title}: {what}" if title else what, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
