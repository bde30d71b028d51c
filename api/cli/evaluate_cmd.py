"""``framepool evaluate``: metrics of a trained run on a split of a store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from api.cli.options import add_store


def register(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a trained run on a split of a store",
        description="Evaluate a run directory on a split; writes <run>/evaluation-<split>.json.",
    )
    p.add_argument("--run", required=True, help="run directory written by framepool train")
    add_store(p)
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.evaluate import evaluate_run, evaluation_file

    progress = args.verbose > 0 or sys.stderr.isatty()
    metrics = evaluate_run(args.run, args.store, split=args.split, progress=progress)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    print(f"run          {args.run}  ({metrics['run_id']}, head {metrics['head']})")
    print(f"split        {metrics['split']}  ({metrics['n_test']} videos)")
    print(
        f"top1         {pct(metrics['top1'])}   top5 {pct(metrics['top5'])}   "
        f"mean class accuracy {pct(metrics['mean_class_accuracy'])}"
    )
    print(f"seconds      {metrics['seconds']:.1f}")
    print(f"written      {Path(args.run) / evaluation_file(args.split)}")
    return 0
