"""The command line's shared vocabulary, help format and light constants.

Every command spells the same thing the same way:

- ``--precision auto|fp32|bf16``: compute precision (``auto``: bfloat16 where the device has
  native support). Old spellings ``--dtype float32|bfloat16`` and ``--amp on|off`` still work.
- ``--streams appearance,motion``: which streams (``both`` = ``appearance,motion``; train also
  takes ``auto``, every stream the store has). Old spelling ``--stream``.
- ``--arch``, ``--weights``, ``--motion-weights``, ``--flow``, ``--flow-weights``: the backbones
  (:func:`add_backbone`, read back as an :class:`extractor.spec.BackboneSpec`); the head options
  (:data:`HEAD_OPTIONS`, read back by :func:`head_kwargs_from`).
- ``--decode-workers N``: threads that decode and prepare videos; ``--workers N``: inference
  workers of the service; ``--threads N``: torch CPU threads. Old spellings ``--workers`` for
  ``extract`` and ``--torch-threads`` for ``serve``.

This module imports nothing heavy, so ``framepool --help`` and usage errors never load torch;
the constants below mirror the packages' own and a test keeps them equal.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from extractor.spec import STREAMS  # imports nothing heavy

if TYPE_CHECKING:
    from extractor.spec import BackboneSpec

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


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


class Parser(argparse.ArgumentParser):
    """``framepool``'s parser: every subcommand gets :class:`HelpFormatter`, and an argument a
    (sub)command does not know is reported by that command's own parser, with its usage and the
    closest option it has (``did you mean --levels?``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    def error(self, message: str) -> NoReturn:
        choice = _INVALID_CHOICE.search(message)
        if choice:
            offered = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), offered, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        unknown = self._unknown_options(getattr(self, "_given", []))
        if unknown:
            if not message.startswith("unrecognized arguments"):
                message += f"; unrecognized {', '.join(unknown)}"
            message += self._suggestion(unknown)
        super().error(message)

    def _visible_options(self) -> list[str]:
        return [
            opt
            for action in self._actions
            if action.help != argparse.SUPPRESS
            for opt in action.option_strings
            if opt.startswith("--")
        ]

    def _unknown_options(self, given: Sequence[str]) -> list[str]:
        """The options in ``given`` (up to a ``--``) that this parser does not know, neither
        whole nor as the unique abbreviation argparse accepts."""
        known = list(self._option_string_actions)
        out = []
        for token in given:
            if token == "--" or (self._subparsers is not None and not token.startswith("-")):
                break  # the rest belongs to the subcommand, which checks it
            if not token.startswith("--") or len(token) < 3:
                continue
            option = token.split("=", 1)[0]
            if option in known or sum(k.startswith(option) for k in known) == 1:
                continue
            out.append(option)
        return out

    def _suggestion(self, unknown: Sequence[str]) -> str:
        """`` (did you mean --x?)``: the visible options closest to the ``unknown`` ones;
        empty when none is close."""
        guesses: list[str] = []
        for option in unknown:
            close = difflib.get_close_matches(option, self._visible_options(), n=1, cutoff=0.6)
            if close and close[0] not in guesses:
                guesses.append(close[0])
        return f" (did you mean {' or '.join(guesses)}?)" if guesses else ""


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


def add_precision(
    group: Any,
    *,
    old_dtype: bool = False,
    old_amp: bool = False,
    help: str = "compute precision; auto: bf16 where the device supports it natively",
) -> None:
    """``--precision auto|fp32|bf16`` (dest ``precision``), plus the old spellings."""
    group.add_argument("--precision", default="auto", choices=PRECISIONS, help=help)
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


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


# ---------------------------------------------------------------------------- option groups
PRECISION_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}  # extractor dtypes
FINETUNE_ARCHS = ("resnet18", "resnet50", "resnet101")  # what end-to-end fine-tuning trains


def arch_name(text: str) -> str:
    """A ResNet of :data:`RESNET_ARCHS` or ``timm:<name>``."""
    if text in RESNET_ARCHS:
        return text
    for prefix in ("timm:", "hf:"):
        if text.startswith(prefix) and len(text) > len(prefix):
            return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(sorted(RESNET_ARCHS))}, timm:<name> or hf:<model>, got {text}"
    )


_TIMM_WEIGHTS = "; timm's pretrained weights for timm:<name>"


def add_backbone(group: Any, *, timm: bool = True) -> None:
    """The backbone options (those of :class:`extractor.spec.BackboneSpec` but streams and
    dtype): ``--arch`` (any timm model too with ``timm``, then also ``--motion-arch``),
    ``--weights``, ``--motion-weights``, ``--flow``, ``--flow-weights``."""
    if timm:
        group.add_argument(
            "--arch",
            default="resnet101",
            type=arch_name,
            metavar="ARCH",
            help=f"backbone: {', '.join(sorted(RESNET_ARCHS))}, timm:<name> for any timm "
            "model (appearance only, with the model's own preprocessing), or hf:<model> for a "
            "transformers video model (VideoMAE, V-JEPA 2: one row per window of frames)",
        )
        group.add_argument(
            "--motion-arch",
            default=None,
            choices=sorted(RESNET_ARCHS),
            help="the motion stream's ResNet (default: --arch; required with a timm --arch)",
        )
    else:
        group.add_argument("--arch", default="resnet101", choices=FINETUNE_ARCHS)
    group.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (torchvision's checkpoint, downloaded into the torch hub cache when "
        f"missing{_TIMM_WEIGHTS if timm else ''}), random (seeded), or a state-dict PATH",
    )
    group.add_argument(
        "--motion-weights",
        help="motion backbone weights (default: --weights; a 3-channel conv1 is "
        "cross-modality initialised)",
    )
    group.add_argument("--flow", default="dis", choices=FLOW_BACKENDS, help="optical flow backend")
    group.add_argument("--flow-weights", help="RAFT weights file (for --flow raft)")


def backbone_spec_from(
    args: argparse.Namespace,
    streams: Sequence[str],
    *,
    dtype: str = "auto",
    weights: str | Path | None = None,
    motion_weights: str | Path | None = None,
) -> BackboneSpec:
    """The :class:`extractor.spec.BackboneSpec` of :func:`add_backbone`'s options (``weights``
    and ``motion_weights`` replace ``--weights`` and ``--motion-weights`` when given), and of
    ``--flow-precision`` where the command has it."""
    from extractor.spec import BackboneSpec

    flow_precision = getattr(args, "flow_precision", None)
    return BackboneSpec(
        streams=tuple(streams),
        arch=args.arch,
        motion_arch=getattr(args, "motion_arch", None),
        weights=args.weights if weights is None else weights,
        motion_weights=args.motion_weights if weights is None else motion_weights,
        flow=args.flow,
        flow_weights=args.flow_weights,
        flow_params={"dtype": PRECISION_DTYPES[flow_precision]} if flow_precision else None,
        dtype=dtype,
    )


def add_device(group: Any) -> None:
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_store(group: Any) -> None:
    group.add_argument("--store", required=True, help="feature store path or fsspec URL")


def add_labels(group: Any) -> None:
    group.add_argument(
        "--labels",
        help="CSV with columns path,label[,split][,group] (default: label = parent folder); "
        "group names the subject or session a video shares with others, and train validates on "
        "whole groups",
    )


@dataclass(frozen=True)
class HeadOption:
    """A head option: the heads it applies to, how to read it, and what it means."""

    heads: tuple[str, ...]
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None


# option dest -> what it is ("{heads}": the heads of the command that take it); the flag is
# --dest with dashes (--C keeps its case)
HEAD_OPTIONS: dict[str, HeadOption] = {
    "levels": HeadOption(("tp", "tpp", "svm"), "pyramid depth D ({levels})", int),
    "variant": HeadOption(("tp", "svm"), "{heads} node map (concat)", None, ("concat", "average")),
    "pyramids": HeadOption(("tp",), "{heads}: number of stacked pyramids P (1)", int),
    "node_dim": HeadOption(("tp",), "{heads} concat: node projection size (128)", int),
    "pooling": HeadOption(
        ("tpp",),
        "{heads} pooling (max; train with neither --pooling nor --levels: average over the "
        "node-mean probe's pyramid)",
        None,
        ("max", "average"),
    ),
    "segments": HeadOption(
        ("datp", "attn"), "{heads}: number of segments N (datp 10, attn 32)", int
    ),
    "queries": HeadOption(("attn",), "{heads}: number of learned queries (4)", int),
    "gaussians": HeadOption(("datp",), "{heads}: mixture size K (2)", int),
    "weights_model": HeadOption(("datp",), "{heads} weights (mog)", None, ("mog", "discrete")),
    "out_dim": HeadOption(("stcb", "stpn"), "{heads}: fused dimension (4096)", int),
    "paths": HeadOption(("stcb", "stpn"), "{heads}: temporal paths fused (3)", int),
    "pathways": HeadOption(
        ("stpn",),
        "{heads}: pathways fused at the top, comma-separated among spatial, temporal, "
        "attended, fused (spatial,temporal,attended)",
    ),
    "dropout": HeadOption(
        ("gap", "max", "tp", "tpp", "datp", "stcb", "stpn", "attn"),
        "dropout before the classifier",
        float,
    ),
    "C": HeadOption(("svm",), "SVM soft-margin C (default: chosen from 0.1, 1, 10)", float),
    "kernel": HeadOption(("svm",), "node kernel (linear)", None, ("linear", "rbf", "chi2")),
    "max_iter": HeadOption(("svm",), "alternating iterations (50)", int),
    "eps": HeadOption(("svm",), "relative duality gap to stop at (1e-3)", float),
}
_LEVELS_DEFAULT = {
    "tp": "6",
    "tpp": "3; train without --pooling: --probe-levels",
    "svm": "chosen on validation in 1-6",
}


def _head_flag(dest: str) -> str:
    return "--C" if dest == "C" else "--" + dest.replace("_", "-")


def add_head_options(group: Any, dests: Sequence[str], *, heads: Sequence[str]) -> None:
    """The head options ``dests`` of :data:`HEAD_OPTIONS`, their help naming those of ``heads``
    (the heads the command offers) that take them."""
    for dest in dests:
        option = HEAD_OPTIONS[dest]
        takers = [h for h in option.heads if h in heads]
        levels = ", ".join(f"{h}: {_LEVELS_DEFAULT[h]}" for h in takers if h in _LEVELS_DEFAULT)
        group.add_argument(
            _head_flag(dest),
            dest=dest,
            type=option.type,
            choices=option.choices,
            help=option.help.format(heads=", ".join(takers), levels=levels),
        )


def head_kwargs_from(args: argparse.Namespace) -> dict[str, Any]:
    """The head class's keyword arguments from the head options that were given (a command
    without one of :data:`HEAD_OPTIONS` reads it as not given); an option given for a head it
    does not apply to is a usage error."""
    from api.cli.errors import UsageError

    given: dict[str, Any] = {
        d: getattr(args, d) for d in HEAD_OPTIONS if getattr(args, d, None) is not None
    }
    for dest in given:
        if args.head not in HEAD_OPTIONS[dest].heads:
            raise UsageError(f"{_head_flag(dest)} does not apply to --head {args.head}")
    kw: dict[str, Any] = {}
    if args.head == "tp":
        if "levels" in given:
            kw["depth"] = given["levels"]
        kw.update({d: given[d] for d in ("variant", "pyramids", "node_dim") if d in given})
    elif args.head == "tpp":
        if "levels" in given:
            if given["levels"] < 1:
                raise UsageError(f"--levels must be >= 1, got {given['levels']}")
            kw["levels"] = tuple(1 << i for i in range(given["levels"]))
        if "pooling" in given:
            kw["pooling"] = given["pooling"]
    elif args.head == "datp":
        kw.update({d: given[d] for d in ("segments", "gaussians") if d in given})
        if "weights_model" in given:
            kw["weights"] = given["weights_model"]
    elif args.head == "attn":
        kw.update({d: given[d] for d in ("segments", "queries") if d in given})
    elif args.head in ("stcb", "stpn"):
        kw.update({d: given[d] for d in ("out_dim", "paths") if d in given})
        if "pathways" in given:
            kw["pathways"] = tuple(p.strip() for p in given["pathways"].split(",") if p.strip())
    if "dropout" in given:
        kw["dropout"] = given["dropout"]
    return kw
