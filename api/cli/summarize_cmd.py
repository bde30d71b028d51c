"""``framepool summarize``: mean +- std of accuracies over runs (e.g. splits 1..3)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from api.cli import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "summarize",
        help="mean +- std of top1/top5/mean class accuracy over runs",
        description="Summarise run directories (e.g. one per split) from their metrics.json.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--out", help="also write the summary as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.evaluate import SUMMARY_KEYS, summarize_runs

    if len(set(args.runs)) != len(args.runs):
        raise UsageError("a run directory is given twice")
    summary = summarize_runs(args.runs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    print("| run | head | n_test | top1 % | top5 % | mean class acc % |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in summary["runs"]:
        print(
            f"| {r['run']} | {r['head']} | {r['n_test']} | {pct(r['top1'])} | {pct(r['top5'])} "
            f"| {pct(r['mean_class_accuracy'])} |"
        )
    cells = []
    for k in SUMMARY_KEYS:
        s = summary[k]
        cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s["n"] else "-")
    print(
        f"| mean ± std ({summary['n_runs']} runs) | {', '.join(summary['heads'])} | | "
        + " | ".join(cells)
        + " |"
    )
    return 0
