"""What the benchmark scripts share: where the real clips are, CPU seconds, peak RSS, and the
markdown tables they print.

A script runs as ``python benchmarks/NAME.py``, so this folder is first on ``sys.path`` and
``import _common`` finds this module.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the packages, for the scripts' own imports

DEFAULT_VIDEOS = REPO.parent / "shared" / "data" / "videos"
SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm"}


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser (``doc``: its module docstring) with ``--videos``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--videos", type=Path, default=DEFAULT_VIDEOS, help="folder of real clips")
    return p


def real_clips(folder: Path) -> list[Path]:
    """The video files in ``folder``, sorted by name."""
    return sorted(c for c in folder.iterdir() if c.suffix.lower() in SUFFIXES)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib(children: bool = False) -> float:
    """This process's peak resident set (with ``children``: or its largest child's), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if children:
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return peak / 1024


def table_head(columns: Sequence[str], *, text_columns: int) -> str:
    """A markdown table's header and rule: the first ``text_columns`` left-aligned, the rest
    (numbers) right-aligned."""
    rule = ["---"] * text_columns + ["---:"] * (len(columns) - text_columns)
    return f"| {' | '.join(columns)} |\n| {' | '.join(rule)} |"


def table_row(*cells: object) -> str:
    return f"| {' | '.join(str(c) for c in cells)} |"
