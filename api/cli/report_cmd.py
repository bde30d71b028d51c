"""``framepool report``: one self-contained HTML page comparing run directories."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from api.cli import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="one HTML page comparing runs: configuration, accuracies beside the probes, beta, "
        "curves, confusion matrices",
        description="Write one self-contained HTML page (images inline, no external link) that "
        "compares the given run directories side by side.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument(
        "--out", default="report.html", metavar="FILE.html", help="page to write (report.html)"
    )
    p.add_argument("--title", default="framepool runs", help="the page's title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.report import write_report

    if len({str(Path(r).resolve()) for r in args.runs}) != len(args.runs):
        raise UsageError("a run directory is given twice")
    for r in args.runs:
        if not Path(r).is_dir():
            raise UsageError(f"run directory {r!r} does not exist")
    path = write_report(args.runs, args.out, title=args.title)
    print(f"wrote {path} ({len(args.runs)} run(s))")
    return 0
