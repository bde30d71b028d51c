"""``framepool train``: fit a pooling head on a store's cached features, write a run directory."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from api.cli import UsageError
from api.cli.options import add_streams

# The head names; their classes are aggregator.heads.HEADS (imported only when training, so that
# `framepool --help` does not load torch); svm is the scikit-learn estimator, trained apart.
HEAD_NAMES = ("gap", "max", "tp", "tpp", "datp", "stcb", "svm")

# head-specific options: option dest -> heads it applies to
_APPLIES: dict[str, tuple[str, ...]] = {
    "levels": ("tp", "tpp", "svm"),
    "variant": ("tp", "svm"),
    "pyramids": ("tp",),
    "node_dim": ("tp",),
    "pooling": ("tpp",),
    "segments": ("datp",),
    "gaussians": ("datp",),
    "weights_model": ("datp",),
    "out_dim": ("stcb",),
    "paths": ("stcb",),
    "dropout": ("gap", "max", "tp", "tpp", "datp", "stcb"),
    "C": ("svm",),
    "kernel": ("svm",),
    "max_iter": ("svm",),
    "eps": ("svm",),
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a pooling head on cached features",
        description="Train a pooling head on a store's cached features and write a run "
        "directory (config.json, model.pt, metrics.json, plots).",
    )
    p.add_argument("--store", required=True, help="feature store path or URL")
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
    head = p.add_argument_group("head")
    head.add_argument("--levels", type=int, help="pyramid depth D (tp: 6, tpp: 3, svm: 6)")
    head.add_argument("--variant", choices=("concat", "average"), help="tp/svm node map")
    head.add_argument("--pyramids", type=int, help="tp: number of stacked pyramids P")
    head.add_argument("--node-dim", type=int, help="tp concat: node projection size (128)")
    head.add_argument("--pooling", choices=("max", "average"), help="tpp pooling (max)")
    head.add_argument("--segments", type=int, help="datp: number of segments N (10)")
    head.add_argument("--gaussians", type=int, help="datp: mixture size K (2)")
    head.add_argument("--weights-model", choices=("mog", "discrete"), help="datp weights (mog)")
    head.add_argument("--out-dim", type=int, help="stcb: fused dimension (4096)")
    head.add_argument("--paths", type=int, help="stcb: temporal paths fused per stream (3)")
    head.add_argument("--dropout", type=float, help="dropout before the classifier")
    head.add_argument("--fusion", choices=("learned", "fixed"), help="stream fusion weights")
    head.add_argument(
        "--fusion-weights", help="initial/fixed stream weights, e.g. appearance=0.5,motion=0.5"
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=30)
    opt.add_argument("--batch-size", type=int, default=128)
    opt.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    opt.add_argument("--lr", type=float, help="learning rate (adam 1e-3, sgd 1e-2)")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--patience", type=int, default=10, help="early stopping; 0 disables")
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
    svm.add_argument("--C", type=float, help="SVM soft-margin C (1.0)")
    svm.add_argument("--kernel", choices=("linear", "rbf", "chi2"), help="node kernel (linear)")
    svm.add_argument("--max-iter", type=int, help="alternating iterations (50)")
    svm.add_argument("--eps", type=float, help="relative duality gap to stop at (1e-3)")
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


def head_kwargs_from(args: argparse.Namespace) -> dict[str, Any]:
    """The head class's keyword arguments from the head options that were given."""
    for dest, heads in _APPLIES.items():
        if getattr(args, dest) is not None and args.head not in heads:
            flag = "--" + dest.replace("_", "-") if dest != "C" else "--C"
            raise UsageError(f"{flag} does not apply to --head {args.head}")
    kw: dict[str, Any] = {}
    if args.head == "tp":
        if args.levels is not None:
            kw["depth"] = args.levels
        for dest in ("variant", "pyramids", "node_dim"):
            if getattr(args, dest) is not None:
                kw[dest] = getattr(args, dest)
    elif args.head == "tpp":
        if args.levels is not None:
            if args.levels < 1:
                raise UsageError(f"--levels must be >= 1, got {args.levels}")
            kw["levels"] = tuple(1 << i for i in range(args.levels))
        if args.pooling is not None:
            kw["pooling"] = args.pooling
    elif args.head == "datp":
        if args.segments is not None:
            kw["segments"] = args.segments
        if args.gaussians is not None:
            kw["gaussians"] = args.gaussians
        if args.weights_model is not None:
            kw["weights"] = args.weights_model
    elif args.head == "stcb":
        if args.out_dim is not None:
            kw["out_dim"] = args.out_dim
        if args.paths is not None:
            kw["paths"] = args.paths
    if args.dropout is not None:
        kw["dropout"] = args.dropout
    return kw


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
    secs = f"seconds      {metrics.get('seconds', 0.0):.1f}"
    if "seconds_train" in metrics:
        secs += (
            f"  (data {metrics['seconds_data']:.1f}, training {metrics['seconds_train']:.1f}; "
            f"{metrics['epochs_run']} epochs, best {metrics['best_epoch']})"
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


def run(args: argparse.Namespace) -> int:
    from aggregator.data import open_store

    store = open_store(args.store, writable=False)
    videos = store.videos()
    if not videos:
        raise UsageError(f"store {args.store!r} has no complete video")
    streams = resolve_streams(args.stream, store.streams(videos[0]))
    test_split = args.test_split or None
    if args.head == "svm":
        kw = head_kwargs_from(args)  # rejects options that do not apply
        del kw
        from aggregator.svm_run import train_svm  # type: ignore[import-not-found,unused-ignore]

        metrics = train_svm(
            args.store,
            args.out,
            streams=streams,
            levels=6 if args.levels is None else args.levels,
            variant=args.variant or "concat",
            C=1.0 if args.C is None else args.C,
            kernel=args.kernel or "linear",
            train_split=args.train_split,
            test_split=test_split,
            seed=args.seed,
            max_iter=50 if args.max_iter is None else args.max_iter,
            eps=1e-3 if args.eps is None else args.eps,
        )
    else:
        from aggregator.train import train_run

        metrics = train_run(
            args.store,
            args.out,
            head=args.head,
            streams=streams,
            head_kwargs=head_kwargs_from(args),
            fusion=args.fusion,
            fusion_weights=parse_fusion_weights(args.fusion_weights, streams),
            train_split=args.train_split,
            test_split=test_split,
            val_fraction=args.val_fraction,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            weight_decay=args.weight_decay,
            patience=args.patience or None,
            seed=args.seed,
            device=args.device,
            inputs=args.inputs,
            precision=args.precision,
            threads=args.threads,
            make_plots=not args.no_plots,
            progress=args.verbose > 0 or sys.stderr.isatty(),
        )
    print(format_summary(metrics, args.out))
    if not args.no_index:
        from aggregator.similarity import build_index

        index = build_index(args.out, args.store, split=args.train_split)
        print(f"index        {len(index)} training videos for /v1/similar -> {args.out}")
    return 0
