"""``framepool`` command line: one console script, one module per subcommand.

Each subcommand module exposes ``register(subparsers)`` that adds its parser and sets
``func(args) -> int`` as the handler. Exit status: 0 success, 1 partial failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other work (or with
# framepool's own decode threads), spinning workers stall each other. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# subcommand name -> module under api.cli (imported lazily so `framepool --help` stays fast)
_SUBCOMMANDS: dict[str, str] = {
    "extract": "api.cli.extract_cmd",
    "store": "api.cli.store_cmd",
    "train": "api.cli.train_cmd",
    "evaluate": "api.cli.evaluate_cmd",
    "summarize": "api.cli.summarize_cmd",
    "index": "api.cli.index_cmd",
    "finetune": "api.cli.finetune_cmd",
    "serve": "api.cli.serve_cmd",
    "quickstart": "api.cli.quickstart_cmd",
}


class UsageError(Exception):
    """A command-line value that cannot be used; reported with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from api.cli.options import Parser

    parser = Parser(
        prog="framepool",
        description="Per-frame video features once; temporal pooling heads in seconds.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # not built yet in this version
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"framepool {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as exc:
        print(f"framepool {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
