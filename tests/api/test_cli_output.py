"""What the command line prints is what a user can read: a summary, not a solver's chatter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import Served

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``framepool`` in a fresh process, so that what C libraries print on file descriptor 1 and
    once per process (the HiGHS banner) is seen."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def test_svm_training_on_real_clips_prints_its_summary_and_one_solver_line(
    served: Served, tmp_path: Path
) -> None:
    out = tmp_path / "run-svm"
    proc = _cli(
        "train", "--store", str(served.store), "--head", "svm", "--out", str(out),
        "--levels", "3", "--device", "cpu", "--no-plots",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stdout, stderr = proc.stdout.splitlines(), proc.stderr.splitlines()
    assert "HiGHS" not in proc.stdout + proc.stderr
    assert "Solution may be inaccurate" not in proc.stderr
    assert "level projection failed" not in proc.stderr
    assert stderr == [], stderr
    # the summary: one line per topic (run, head, scores, probes, selection, solvers, the check
    # against the probe, seconds, per stream, fusion, beta per stream, index)
    assert stdout[0].startswith("run ") and len(stdout) <= 16, stdout
    assert sum(line.startswith("vs probe ") for line in stdout) == 1
    notes = json.loads((out / "metrics.json").read_text())["solver_notes"]
    assert notes["solves"] > 0
    solver_lines = [line for line in stdout if line.startswith("solvers ")]
    reported = notes["inaccurate"] or notes["level_fallbacks"]
    assert len(solver_lines) == (1 if reported else 0)
    if reported:
        assert notes["summary"] in solver_lines[0]
