"""``framepool`` command line: one console script, one module per subcommand.

Each subcommand module exposes ``register(subparsers)`` that adds its parser and sets
``func(args) -> int`` as the handler.

Exit status: 0 success; 1 failed work (some videos failed, damaged store data, a disk error);
2 usage error (a bad option or value, a path that does not exist or is not a store); 141 when
whoever reads the output stopped reading (``framepool store info S --json | head``), quietly.
Known failures are one line on stderr (``-v`` adds the traceback); anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from api.cli.errors import UsageError

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
    "report": "api.cli.report_cmd",
    "index": "api.cli.index_cmd",
    "finetune": "api.cli.finetune_cmd",
    "serve": "api.cli.serve_cmd",
    "quickstart": "api.cli.quickstart_cmd",
}


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


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # as if killed by SIGPIPE, the shell's convention

_PACKAGES = tuple(
    str(Path(__file__).resolve().parents[2] / name) + os.sep
    for name in ("storage", "extractor", "aggregator", "api")
)
_BAD_PATH = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _frames(tb: TracebackType | None) -> list[tuple[str, dict[str, object]]]:
    out = []
    while tb is not None:
        out.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_locals))
        tb = tb.tb_next
    return out


def _ours(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGES)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


def known_failure(exc: BaseException) -> tuple[int, str] | None:
    """``(exit status, one-line message)`` for an expected kind of failure, None for a bug.

    Expected: :class:`UsageError`; a path that does not exist or cannot be used; a ValueError or
    KeyError that framepool raised itself (its errors name the bad value); an error raised by the
    storage libraries under ``storage/`` (damaged store data: a truncated chunk, broken
    metadata); any other OSError (a full disk). A ValueError from deep inside a library that
    framepool called is not expected: it is a bug and keeps its traceback.
    """
    if isinstance(exc, UsageError):
        return EXIT_USAGE, _message(exc)
    from storage.layout import CorruptVideoError  # here: the CLI starts without the store

    if isinstance(exc, CorruptVideoError):  # damaged data, not a bad value: the work failed
        return EXIT_FAILED, _message(exc)
    if isinstance(exc, _BAD_PATH):
        return EXIT_USAGE, _message(exc)
    layout = sys.modules.get("storage.layout")  # loaded whenever the store raised its error
    if layout is not None and isinstance(exc, layout.CorruptVideoError):
        return EXIT_FAILED, _message(exc)  # damaged store data, named by video and chunk file
    frames = _frames(exc.__traceback__)
    raised_here = bool(frames) and _ours(frames[-1][0])
    if isinstance(exc, ValueError | KeyError) and raised_here:
        return EXIT_USAGE, _message(exc)
    ours = [(f, local) for f, local in frames if _ours(f)]
    if ours and not raised_here and os.sep + "storage" + os.sep in ours[-1][0]:
        local = ours[-1][1]
        what = ", ".join(
            f"{k} {local[k]!r}"
            for k in ("video_id", "stream", "name")
            if isinstance(local.get(k), str)
        )
        where = f" ({what})" if what else ""
        return EXIT_FAILED, f"damaged store data{where}: {type(exc).__name__}: {_message(exc)}"
    if isinstance(exc, OSError):
        return EXIT_FAILED, _message(exc)
    return None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        known = known_failure(exc)
        if known is None:
            traceback.print_exc()
            print(
                f"framepool {args.command}: internal error: {type(exc).__name__}: "
                f"{_message(exc)} (a bug: the traceback above says where)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if args.verbose:
            traceback.print_exc()
        code, message = known
        print(f"framepool {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
