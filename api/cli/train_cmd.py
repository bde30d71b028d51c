"""``framepool train``: fit a pooling head on a store's cached features, write a run directory."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from api.cli import UsageError
from api.cli.options import add_head_options, add_store, add_streams, head_kwargs_from

if TYPE_CHECKING:
    from aggregator.train_config import BaseTrainConfig

# The head names; their classes are aggregator.heads.HEADS (imported only when training, so that
# `framepool --help` does not load torch); svm is the scikit-learn estimator, trained apart.
HEAD_NAMES = ("gap", "max", "tp", "tpp", "datp", "stcb", "stpn", "attn", "svm")
_HEAD_OPTIONS = (
    "levels", "variant", "pyramids", "node_dim", "pooling", "segments", "gaussians",
    "weights_model", "out_dim", "paths", "pathways", "queries", "dropout",
)  # fmt: skip


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a pooling head on cached features",
        description="Train a pooling head on a store's cached features and write a run "
        "directory (config.json, model.pt, metrics.json, plots).",
    )
    add_store(p)
    p.add_argument("--head", required=True, choices=HEAD_NAMES)
    p.add_argument("--out", required=True, help="run directory to write")
    add_streams(
        p,
        default="auto",
        dest="stream",
        help="appearance, motion, both (appearance,motion), or auto: every one of them the "
        "store has",
    )
    data = p.add_argument_group("data")
    data.add_argument("--train-split", default="train")
    data.add_argument("--test-split", default="test")
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each class of the training split held out for model selection",
    )
    data.add_argument(
        "--val-groups",
        default="auto",
        metavar="auto|none|REGEX",
        help="hold out whole groups for validation: auto (default) uses the groups stored with "
        "the videos (a labels CSV's group column) when every training video has one; none draws "
        "at random; a regular expression takes each video id's first capture group, e.g. "
        "'_(g[0-9]+)_' for UCF101's v_<Class>_g08_c01",
    )
    head = p.add_argument_group("head")
    add_head_options(head, _HEAD_OPTIONS, heads=HEAD_NAMES)
    head.add_argument("--fusion", choices=("learned", "fixed"), help="stream fusion weights")
    head.add_argument(
        "--fusion-weights", help="initial/fixed stream weights, e.g. appearance=0.5,motion=0.5"
    )
    opt = p.add_argument_group(
        "optimisation",
        "By default the learning rate and weight decay are chosen on the validation part from a "
        "3 x 3 grid, then refit on the whole training split for the step budget (warmup + "
        "cosine); inputs are standardised with training-split statistics.",
    )
    opt.add_argument("--steps", type=int, help="optimiser steps (default 1000)")
    opt.add_argument(
        "--epochs", type=int, help="passes over the training videos (wins over --steps)"
    )
    opt.add_argument(
        "--batch-size", type=int, help="videos per step (default: n_train / 8 within [8, 128])"
    )
    opt.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    opt.add_argument(
        "--lr", type=float, help="fixed learning rate (default: chosen from 1e-3, 1e-2, 1e-1)"
    )
    opt.add_argument(
        "--weight-decay", type=float, help="fixed L2 weight decay (default: chosen from 1e-4..1e-2)"
    )
    opt.add_argument(
        "--no-refit",
        action="store_true",
        help="keep the chosen configuration trained without its validation part",
    )
    opt.add_argument(
        "--no-standardize", action="store_true", help="feed the features unstandardised"
    )
    opt.add_argument(
        "--no-probe", action="store_true", help="skip the logistic-regression references"
    )
    opt.add_argument(
        "--probe-levels", type=int, default=4, help="pyramid levels of the node-mean probe (4)"
    )
    opt.add_argument(
        "--no-probe-start",
        action="store_true",
        help="gap, tp concat, tpp: start from random weights, never keep the probe's solution; "
        "svm: never keep the node-mean probe",
    )
    opt.add_argument(
        "--patience", type=int, default=10, help="early stopping in validation passes; 0 disables"
    )
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    opt.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16 trains under bfloat16 autocast; auto: bf16 where native (CUDA, AVX512-BF16)",
    )
    opt.add_argument("--threads", type=int, help="torch CPU threads")
    opt.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="node data held in memory, e.g. 8G or 512M; past it training streams row blocks of "
        "the node cache (default: $FRAMEPOOL_MEMORY_BUDGET, else a quarter of the RAM)",
    )
    opt.add_argument(
        "--inputs",
        choices=("nodes", "frames"),
        default="nodes",
        help="cached node summaries (fast) or padded frames through a DataLoader",
    )
    opt.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    opt.add_argument(
        "--no-index",
        action="store_true",
        help="skip building the similar-video index of the training videos",
    )
    svm = p.add_argument_group("svm")
    add_head_options(svm, ("C", "kernel", "max_iter", "eps"), heads=HEAD_NAMES)
    p.set_defaults(func=run)


def resolve_streams(choice: str, available: list[str]) -> list[str]:
    if choice == "auto":
        found: list[str] = [s for s in ("appearance", "motion") if s in available]
        if not found:
            raise UsageError(f"the store has neither appearance nor motion; it has {available}")
        return found
    streams: list[str] = ["appearance", "motion"] if choice == "both" else [choice]
    missing = [s for s in streams if s not in available]
    if missing:
        raise UsageError(
            f"--stream {choice}: the store has no stream {missing}; it has {available}"
        )
    return streams


def parse_fusion_weights(text: str | None, streams: list[str]) -> dict[str, float] | None:
    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--fusion-weights: cannot read {part!r} as stream=weight") from None
        if not sep:
            raise UsageError(f"--fusion-weights: {part!r} is not stream=weight")
    if set(out) != set(streams):
        raise UsageError(f"--fusion-weights names {sorted(out)}, the streams are {streams}")
    return out


def _versus(head: Any, *probes: Any) -> str:
    known = [p for p in probes if p is not None]
    if head is None or not known:
        return "-"
    diff = 100 * (head - max(known))
    return f"{diff:+.2f} points against the better probe"


def _probe_lines(metrics: dict[str, Any], pct: Any) -> list[str]:
    """The head against its probes on validation (kept start, or which probe was better),
    and the run's warnings."""
    out = []
    check = metrics.get("probe_check") or {}
    named = check.items() if metrics.get("head") == "svm" else [("", check)]
    parts = []
    for stream, c in named:
        if not c:
            continue
        where = f"{stream}: " if stream else ""
        if "kept" in c:
            head = c.get("head_val_top1", c.get("svm_val_top1"))
            parts.append(
                f"{where}probe {c['probe']} {pct(c['val_top1'])} vs trained {pct(head)} on "
                f"{c['videos']} validation videos, kept the {c['kept']}"
            )
        elif c.get("best_probe"):
            best = c["best_probe"]
            parts.append(
                f"{where}probe {best} {pct(c[best]['val_top1'])} vs head "
                f"{pct(c['head_val_top1'])} on {c[best]['videos']} validation videos"
            )
    if parts:
        out.append("vs probe     " + "; ".join(parts))
    out += [f"WARNING      {w}" for w in metrics.get("warnings") or []]
    return out


def format_summary(metrics: dict[str, Any], out: str) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"run          {out}  ({metrics.get('run_id', '-')})",
        f"head         {metrics.get('head')}  streams {', '.join(metrics.get('streams') or [])}",
        f"top1         {pct(metrics.get('top1'))}   top5 {pct(metrics.get('top5'))}   "
        f"mean class accuracy {pct(metrics.get('mean_class_accuracy'))}   "
        f"(n_train {metrics.get('n_train')}, n_test {metrics.get('n_test')})",
    ]
    probe = metrics.get("probe") or {}
    if probe:
        gm, pn = probe.get("global_mean") or {}, probe.get("pyramid_nodes") or {}
        lines.append(
            f"probe        top1 {pct(gm.get('top1'))} logistic regression on the global mean, "
            f"{pct(pn.get('top1'))} on the pyramid node means ({pn.get('levels')} levels); "
            f"head {_versus(metrics.get('top1'), gm.get('top1'), pn.get('top1'))}"
        )
    selection = metrics.get("selection") or {}
    if metrics.get("head") == "svm":
        parts = [
            f"{s} {v['chosen'].get('levels', '?')} levels "
            + ("node-mean probe" if v["chosen"].get("C") is None else f"C {v['chosen']['C']:g}")
            for s, v in selection.items()
        ]
        if parts:
            folds = metrics.get("selection_folds") or []
            where = f" on {sum(folds)} validation videos in {len(folds)} fold(s)" if folds else ""
            lines.append("selection    " + "  ".join(parts) + where)
        notes = (metrics.get("solver_notes") or {}).get("summary")
        if notes:
            lines.append(f"solvers      {notes}")
    elif selection.get("grid"):
        c = selection["chosen"]
        lines.append(
            f"selection    lr {c['lr']:g}  weight decay {c['weight_decay']:g}  of "
            f"{len(selection['grid'])} on validation (top1 {pct(metrics.get('val_top1'))})"
        )
    lines += _probe_lines(metrics, pct)
    secs = f"seconds      {metrics.get('seconds', 0.0):.1f}"
    training = metrics.get("training") or {}
    if "seconds_train" in metrics and training:
        secs += (
            f"  (data {metrics['seconds_data']:.1f}, selection "
            f"{selection.get('seconds', 0.0):.1f}, final training {training['seconds']:.1f}: "
            f"{training['steps']} steps of {training['batch_size']}"
            + (", refit on train + val)" if training.get("refit") else ")")
        )
    lines.append(secs)
    for s, m in (metrics.get("per_stream") or {}).items():
        lines.append(
            f"  {s:<10} top1 {pct(m['top1'])}   mean class accuracy {pct(m['mean_class_accuracy'])}"
        )
    if metrics.get("fusion_weights"):
        lines.append(
            "fusion       "
            + "  ".join(f"{s} {w:.3f}" for s, w in metrics["fusion_weights"].items())
        )
    beta = metrics.get("beta") or {}
    if isinstance(beta, list):
        beta = {"beta": beta}
    for s, levels in beta.items():
        mass = "  ".join(f"l{i + 1} {sum(lv):.3f}" for i, lv in enumerate(levels))
        lines.append(f"beta {s:<8} level mass  {mass}")
        flat = [(b, li + 1, k + 1) for li, lv in enumerate(levels) for k, b in enumerate(lv)]
        b, level, k = max(flat)
        lines.append(f"{'':13} heaviest node (level {level}, k {k}) {b:.3f}")
    return "\n".join(lines)


def apply_memory_budget(text: str | None) -> None:
    """Make ``--memory-budget`` the budget of this process (and of what it starts)."""
    if text is None:
        return
    from aggregator.node_cache import BUDGET_ENV, parse_bytes

    try:
        parse_bytes(text)
    except ValueError as exc:
        raise UsageError(f"--memory-budget: {exc}") from None
    os.environ[BUDGET_ENV] = text


# command-line flags that switch a config field off
_NEGATED = {
    "refit": "no_refit",
    "standardize": "no_standardize",
    "standardize_inputs": "no_standardize",
    "probe": "no_probe",
    "probe_start": "no_probe_start",
}


def config_from_args(args: argparse.Namespace, streams: list[str]) -> BaseTrainConfig:
    """The config of ``args.head``'s trainer (:func:`aggregator.trainers.config_class`) from the
    parsed options: every config field whose option was given (a ``--no-X`` flag for a field
    that is on by default); the fields no option sets keep their defaults."""
    import dataclasses

    from aggregator.streams import MAP_HEADS
    from aggregator.trainers import config_class

    cls = config_class(args.head)
    values: dict[str, Any] = {
        "head": args.head,
        "head_kwargs": head_kwargs_from(args),
        "test_split": args.test_split or None,
        "patience": args.patience or None,
    }
    if args.head not in MAP_HEADS:  # the map heads read their own streams
        values["streams"] = tuple(streams)
        values["fusion_weights"] = parse_fusion_weights(args.fusion_weights, streams)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        if f.name in _NEGATED:
            values[f.name] = not getattr(args, _NEGATED[f.name])
        elif getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in values.items() if k in names})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from aggregator.data import open_store

    apply_memory_budget(getattr(args, "memory_budget", None))

    store = open_store(args.store, writable=False)
    videos = store.videos()
    if not videos:
        raise UsageError(f"store {args.store!r} has no complete video")
    streams = resolve_streams(args.stream, store.streams(videos[0]))
    from aggregator.trainers import train

    metrics = train(
        args.store,
        args.out,
        config_from_args(args, streams),
        make_plots=not args.no_plots,
        progress=args.verbose > 0 or sys.stderr.isatty(),
    )
    print(format_summary(metrics, args.out))
    if not args.no_index:
        from aggregator.similarity import build_index

        index = build_index(args.out, args.store, split=args.train_split)
        print(f"index        {len(index)} training videos for /v1/similar -> {args.out}")
    return 0
