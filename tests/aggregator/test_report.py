"""``aggregator.report``: the comparison page says what each run's files say, and stands alone.

Run directories written here by hand hold known numbers; the page is read back with the
standard library's HTML parser. (The browser tests in ``tests/api`` open reports of trained
runs in chromium.)
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from aggregator.report import beta_levels, load_view, render_report

BETA = [[0.2], [0.3, 0.1], [0.05, 0.15, 0.1, 0.1]]


class _Page(HTMLParser):
    """Table rows (header and cells as text), the cells of beta heatmaps and the images."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cells: list[str] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None
        self._beta: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell = []
        elif tag == "span" and a.get("class") == "cell":
            self._beta = []
        elif tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "span" and self._beta is not None:
            self.cells.append("".join(self._beta))
            self._beta = None

    def handle_data(self, data: str) -> None:
        for part in (self._cell, self._beta):
            if part is not None:
                part.append(data)


def _run(root: Path, name: str, head: str, metrics: dict[str, Any]) -> Path:
    run = root / name
    run.mkdir()
    config = {
        "format": "framepool-run/1",
        "head": head,
        "run_id": f"{name}-0123abcd",
        "head_kwargs": {"depth": 3} if head == "tp" else {},
        "streams": ["appearance"],
        "class_names": ["a", "b"],
        "extractor": {"appearance": {"arch": "resnet18", "weights": "random"}},
        "splits": {"train": "train", "test": "test"},
        "seed": 3,
        "train_args": {"epochs": 7},
    }
    (run / "config.json").write_text(json.dumps(config))
    if metrics:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _metrics(top1: float, **extra: Any) -> dict[str, Any]:
    return {
        "top1": top1,
        "top5": 1.0,
        "mean_class_accuracy": top1 - 0.05,
        "confusion_matrix": [[3, 1], [0, 4]],
        "n_train": 20,
        "n_test": 8,
        "seconds": 12.5,
        "probe": {
            "global_mean": {"top1": 0.625, "mean_class_accuracy": 0.6},
            "pyramid_nodes": {"top1": 0.75, "mean_class_accuracy": 0.7},
        },
        "history": [
            {"step": s, "train_loss": 1.0 / s, "train_top1": 0.1 * s, "val_top1": 0.08 * s}
            for s in range(1, 6)
        ],
        **extra,
    }


def test_two_runs_side_by_side(tmp_path: Path) -> None:
    tp = _run(tmp_path, "tp", "tp", _metrics(0.875, beta={"appearance": BETA}))
    gap = _run(tmp_path, "gap", "gap", _metrics(0.5))
    html = render_report([tp, gap], title="two runs")
    page = _Page()
    page.feed(html)
    rows = {r[0]: r[1:] for r in page.rows if r}
    assert rows["run"] == ["tp-0123abcd", "gap-0123abcd"]
    assert rows["head"] == ["tp", "gap"]
    assert rows["test top-1"] == [
        "87.5 %  (probes: global mean 62.5 %, nodes 75.0 %)",
        "50.0 %  (probes: global mean 62.5 %, nodes 75.0 %)",
    ]
    assert rows["test mean class accuracy"][0].startswith("82.5 %")
    assert rows["seconds (whole run)"] == ["12.50 s", "12.50 s"]
    assert rows["epochs asked"] == ["7", "7"] and rows["seed"] == ["3", "3"]
    # beta of the tp run, level by level, printed in its cells; the gap run has none
    assert page.cells == ["0.20", "0.30", "0.10", "0.05", "0.15", "0.10", "0.10"]
    assert "gap learns no pyramid weights" in html
    # curves and confusion matrix of both runs, inline
    assert len(page.images) == 4
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert re.findall(r"(?:src|href)=\"(?!data:)", html) == []
    assert "http://" not in html and "https://" not in html


def test_a_run_without_metrics_or_history(tmp_path: Path) -> None:
    unfinished = _run(tmp_path, "unfinished", "tp", {})
    svm = _run(tmp_path, "svm", "svm", _metrics(0.75, history=[{"iteration": 1, "gap": 0.1}]))
    html = render_report([unfinished, svm])
    page = _Page()
    page.feed(html)
    rows = {r[0]: r[1:] for r in page.rows if r}
    assert rows["test top-1"][0].startswith("–")
    assert "no training curves" in html and "no confusion matrix" in html
    assert len(page.images) == 1  # the svm run's confusion matrix only


def test_beta_of_stacked_pyramids_and_bad_input(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        "stack",
        "tp",
        _metrics(0.5, beta={"appearance": BETA}, beta_pyramids={"appearance": [BETA, BETA[:2]]}),
    )
    assert beta_levels(load_view(run)) == {"appearance": [BETA, BETA[:2]]}
    with pytest.raises(ValueError, match="no run directory"):
        render_report([])
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        render_report([tmp_path])
