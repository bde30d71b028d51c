"""``framepool summarize``: mean +- std of accuracies over runs of one head and configuration
(e.g. splits 1..3); runs of different heads or configurations form separate groups."""

from __future__ import annotations

import argparse
import json
from typing import Any

from api.cli import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "summarize",
        help="mean +- std of top1/top5/mean class accuracy over runs, per head and configuration",
        description="Summarise run directories (e.g. one per split) from their metrics.json.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--out", help="also write the summary as JSON to this file")
    p.set_defaults(func=run)


def _cell(stats: dict[str, Any]) -> str:
    """``mean ± std`` over several runs, the value alone for one run, ``-`` for none."""
    if not stats["n"]:
        return "-"
    if stats["std"] is None:
        return f"{100 * stats['mean']:.2f}"
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


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

    print(
        "| run | group | head | n_test | top1 % | top5 % | mean class acc % "
        "| probe: global mean % | probe: nodes % |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in summary["runs"]:
        print(
            f"| {r['run']} | {r['group']} | {r['head']} | {r['n_test']} | {pct(r['top1'])} "
            f"| {pct(r['top5'])} | {pct(r['mean_class_accuracy'])} "
            f"| {pct(r['probe_global_mean'])} | {pct(r['probe_pyramid_nodes'])} |"
        )
    print()
    print(
        "| group (head and configuration) | runs | top1 % | top5 % | mean class acc % "
        "| probe: global mean % | probe: nodes % |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for g in summary["groups"]:
        cells = [_cell(g[k]) for k in (*SUMMARY_KEYS, "probe_global_mean", "probe_pyramid_nodes")]
        print(f"| {g['name']} | {g['n_runs']} | " + " | ".join(cells) + " |")
    if len(summary["groups"]) > 1:
        print(
            f"{len(summary['groups'])} groups: runs of different heads or configurations are "
            "not averaged together"
        )
    return 0
