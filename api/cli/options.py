"""The command line's shared vocabulary, help format and light constants.

Every command spells the same thing the same way:

- ``--precision auto|fp32|bf16``: compute precision (``auto``: bfloat16 where the device has
  native support). Old spellings ``--dtype float32|bfloat16`` and ``--amp on|off`` still work.
- ``--streams appearance,motion``: which streams (``both`` = ``appearance,motion``; train also
  takes ``auto``, every stream the store has). Old spelling ``--stream``.
- ``--decode-workers N``: threads that decode and prepare videos; ``--workers N``: inference
  workers of the service; ``--threads N``: torch CPU threads. Old spellings ``--workers`` for
  ``extract`` and ``--torch-threads`` for ``serve``.

This module imports nothing heavy, so ``framepool --help`` and usage errors never load torch;
the constants below mirror the packages' own and a test keeps them equal.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from typing import Any

STREAMS = ("appearance", "motion")
RESNET_ARCHS = ("resnet101", "resnet18", "resnet50")
FLOW_BACKENDS = ("dis", "farneback", "tvl1", "raft")
SPLIT_FORMATS = ("ucf101", "hmdb51")
PRECISIONS = ("auto", "fp32", "bf16")
VIDEO_EXTENSIONS = tuple(
    sorted(
        (".avi", ".flv", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".ogv", ".webm", ".wmv")
    )
)


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default (unless the help already says it or there is none), keeps
    the description's paragraphs, and widens the option column a little."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 32)
        super().__init__(prog, **kwargs)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return not (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or not self._shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(fill(p, width, indent) for p in text.split("\n\n"))


class Parser(argparse.ArgumentParser):
    """``framepool``'s parser: every subcommand gets :class:`HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def deprecation_note(old: str, new: str) -> None:
    print(f"framepool: {old} is deprecated; use {new}", file=sys.stderr)


class Deprecated(argparse.Action):
    """An old option spelling: converts its value, stores it under the new option's dest, and
    says (on stderr) what to write instead. Hidden from ``--help``."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        new: str,
        convert: Callable[[str], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["help"] = argparse.SUPPRESS
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new = new
        self.convert = convert

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        value = self.convert(values) if self.convert is not None else values
        shown = f"{self.new} {value}" if value is not None and value is not True else self.new
        deprecation_note(f"{option_string} {values}", shown)
        setattr(namespace, self.dest, value)


def _choice(mapping: dict[str, str], option: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in mapping:
            raise argparse.ArgumentTypeError(f"{option} takes {', '.join(mapping)}, got {text}")
        return mapping[text]

    return convert


def add_precision(group: Any, *, old_dtype: bool = False, old_amp: bool = False) -> None:
    """``--precision auto|fp32|bf16`` (dest ``precision``), plus the old spellings."""
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="compute precision; auto: bf16 where the device supports it natively",
    )
    if old_dtype:
        group.add_argument(
            "--dtype",
            dest="precision",
            action=Deprecated,
            new="--precision",
            convert=_choice(
                {
                    "auto": "auto",
                    "float32": "fp32",
                    "bfloat16": "bf16",
                    "fp32": "fp32",
                    "bf16": "bf16",
                },
                "--dtype",
            ),
        )
    if old_amp:
        group.add_argument(
            "--amp",
            dest="precision",
            action=Deprecated,
            new="--precision",
            convert=_choice({"auto": "auto", "on": "bf16", "off": "fp32"}, "--amp"),
        )


def stream_list(text: str) -> list[str]:
    """``appearance``, ``motion``, ``appearance,motion`` or ``both`` -> the stream names."""
    if text.strip() == "both":
        return list(STREAMS)
    streams = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in streams if s not in STREAMS]
    if not streams or bad or len(set(streams)) != len(streams):
        raise argparse.ArgumentTypeError(
            f"expected appearance, motion, appearance,motion or both, got {text}"
        )
    return streams


def streams_choice(text: str) -> str:
    """For commands that take ``auto``/``both``/one stream name: ``appearance,motion`` (either
    order) becomes ``both``; anything else is passed on for the command to check."""
    value = text.strip()
    parts = [s.strip() for s in value.split(",") if s.strip()]
    if sorted(parts) == sorted(STREAMS):
        return "both"
    return value


def add_streams(
    group: Any,
    *,
    default: str,
    help: str,
    type: Callable[[str], Any] = streams_choice,
    dest: str = "streams",
    old_stream: bool = True,
) -> None:
    """``--streams`` (stored under ``dest``), and the old ``--stream`` spelling."""
    group.add_argument(
        "--streams", dest=dest, default=default, type=type, metavar="STREAMS", help=help
    )
    if old_stream:
        group.add_argument("--stream", dest=dest, action=Deprecated, new="--streams", convert=type)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
