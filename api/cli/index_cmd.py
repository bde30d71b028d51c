"""``framepool index build``: the similar-video index of a run (faiss, cosine)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from api.cli import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("index", help="build the similar-video search index of a run")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    isub.required = True
    build = isub.add_parser(
        "build",
        help="embed a store split with a run's head and write DIR/index.faiss + index_ids.json",
    )
    build.add_argument("--run", required=True, metavar="DIR", help="trained run directory")
    build.add_argument("--store", required=True, help="the feature store the run was trained on")
    build.add_argument(
        "--split",
        default=None,
        help="store split to index (default: the run's training split; 'all': every video)",
    )
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from aggregator.run_loader import load_run
    from aggregator.similarity import build_index, training_split

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UsageError(f"--run {args.run!r}: no such directory")
    predictor = load_run(run_dir)
    split = training_split(predictor) if args.split is None else args.split
    index = build_index(run_dir, args.store, None if split == "all" else split, predictor=predictor)
    labels = {lb for lb in index.labels if lb is not None}
    print(
        f"indexed {len(index)} videos ({len(labels)} classes, dim {index.dim}, cosine) "
        f"from split {split!r} -> {run_dir / 'index.faiss'}"
    )
    return 0
