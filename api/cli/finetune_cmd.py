"""``framepool finetune``: backbone + pooling head trained end to end with the surrogate gradient.

Every frame goes through the backbone; at epoch r only frames t ≡ r (mod K) carry gradient
(multiple aggregation paper, Eq. 7). ``--head stpn`` (both streams) trains on the backbones'
last block output (spatial maps, see :mod:`aggregator.finetune.maps`). Multi-GPU / multi-node:
``torchrun --nproc-per-node N -m api.cli finetune ...`` (one process per GPU, videos sharded
across ranks, rank 0 writes). A directory that already holds a ``checkpoint.pt`` is resumed from
it (``--no-resume`` starts over).

Writes in ``--out``: ``backbone_appearance.pt`` / ``backbone_motion.pt`` (for ``framepool extract
--weights`` / ``--motion-weights``), ``head.pt`` (= ``model.pt``) and ``config.json`` (a run
directory for ``evaluate`` / ``serve`` on a store re-extracted with those backbones),
``metrics.json`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.cli import UsageError
from api.cli.options import (
    PRECISION_DTYPES,
    add_backbone,
    add_device,
    add_head_options,
    add_labels,
    add_precision,
    add_streams,
    backbone_spec_from,
    head_kwargs_from,
    streams_choice,
)
from api.cli.train_cmd import apply_memory_budget

if TYPE_CHECKING:
    import torch

    from aggregator.finetune.loop import FinetuneSettings

STREAM_CHOICES = ("appearance", "motion", "both")
HEADS = ("gap", "max", "tp", "tpp", "datp", "stcb", "stpn", "attn")  # aggregator.heads.HEADS
HEAD_OPTIONS = ("levels", "variant", "pyramids", "node_dim", "dropout")

_PRECISION_OF_DTYPE = {dtype: name for name, dtype in PRECISION_DTYPES.items()}


def _finetune_streams(text: str) -> str:
    value = streams_choice(text)
    if value not in STREAM_CHOICES:
        raise argparse.ArgumentTypeError(f"expected appearance, motion or both, got {text}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune the backbone(s) and a pooling head end to end",
        description="Fine-tune backbone(s) + pooling head end to end on videos; at epoch r only "
        "frames t = r (mod K) carry gradient into the backbone (multiple aggregation paper, "
        "Eq. 7).",
        epilog="Re-extract a store with the result: framepool extract VIDEOS --store NEW "
        "--weights OUT/backbone_appearance.pt --motion-weights OUT/backbone_motion.pt",
    )
    p.add_argument("--videos", nargs="+", required=True, help="video files, folders, or list files")
    add_labels(p)
    p.add_argument(
        "--out", required=True, help="output directory (resumed when it has a checkpoint)"
    )
    add_streams(
        p,
        default="appearance",
        dest="stream",
        type=_finetune_streams,
        help="appearance, motion, or both (appearance,motion)",
    )
    p.add_argument(
        "--train-split", default="train", help="with a split column: the split to use ('': all)"
    )

    head = p.add_argument_group("head")
    head.add_argument(
        "--head",
        default="tp",
        help="pooling head: gap, max, tp, tpp, datp, stcb, attn, or stpn (spatial maps of both "
        "streams)",
    )
    add_head_options(head, HEAD_OPTIONS, heads=HEADS)
    head.add_argument(
        "--no-standardize",
        action="store_true",
        help="feed the head unstandardised features (default: standardised with statistics of "
        "the training videos under the starting backbones)",
    )
    head.add_argument(
        "--map-dim",
        type=int,
        help="stpn: reduce the maps' channels to N with the fixed random projection "
        "framepool extract --map-dim uses (default: the backbone's C)",
    )
    head.add_argument(
        "--map-stride",
        type=int,
        default=1,
        help="stpn: the head reads the maps of every S-th frame from the first, as framepool "
        "extract --map-stride keeps them (default 1)",
    )

    bb = p.add_argument_group("backbone and inputs")
    add_backbone(bb, timm=False)
    bb.add_argument("--max-frames", type=int, help="keep at most N evenly spaced frames per video")
    bb.add_argument(
        "--store",
        help="feature store of the same videos: frames outside the subset read their features "
        "from it when it was extracted with the same backbone configuration",
    )
    bb.add_argument(
        "--reuse-features",
        action="store_true",
        help="frames outside the subset reuse the features they had at the video's previous "
        "step (at most K-1 epochs old) instead of a no-gradient pass; first epoch computes all",
    )
    bb.add_argument(
        "--cache-dir",
        help="where decoded inputs are cached as uint8 (default OUT/inputs, removed at the end; "
        "'memory' keeps them in memory)",
    )
    bb.add_argument("--keep-inputs", action="store_true", help="keep OUT/inputs at the end")
    bb.add_argument(
        "--reextract",
        metavar="NEW_STORE",
        help="after training, extract the same videos with the fine-tuned backbone(s) into "
        "NEW_STORE (sharded across torchrun ranks like framepool extract)",
    )

    opt = p.add_argument_group("optimisation (multiple aggregation paper defaults)")
    opt.add_argument("--period", type=int, default=1, help="K: 1/K of the frames carry gradient")
    opt.add_argument("--epochs", type=int, default=130)
    opt.add_argument("--batch-videos", type=int, default=4, help="videos per step and process")
    opt.add_argument("--lr", type=float, default=1e-3, help="appearance learning rate")
    opt.add_argument("--motion-lr", type=float, default=5e-3, help="motion learning rate")
    opt.add_argument(
        "--lr-steps", default="25,50,75,100,125", help="appearance: epochs where lr /= 10"
    )
    opt.add_argument("--motion-lr-steps", default="80,110", help="motion: epochs where lr /= 10")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=5e-4)
    opt.add_argument(
        "--grad-scale",
        default="unbiased",
        choices=("unbiased", "sum"),
        help="unbiased: subset gradient x K (its mean over r is the exact gradient); sum: Eq. 7 "
        "literally",
    )
    opt.add_argument("--chunk-size", type=int, default=32, help="frames per backbone call")
    opt.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="recompute gradient chunks in the backward pass: memory of one chunk, not 1/K of T",
    )
    opt.add_argument(
        "--grad-frames",
        type=int,
        default=None,
        metavar="N",
        help="backward pass in chunks of N frames with gradient (their activations recomputed): "
        "memory of N frames whatever the videos' length; the same gradients, one more forward "
        "pass of the subset (default: chosen from --memory-budget)",
    )
    opt.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="memory the run may use, e.g. 6G: the frames with gradient per backward chunk are "
        "chosen so that their activations take a third of it (default: "
        "$FRAMEPOOL_MEMORY_BUDGET, else a quarter of the RAM; --grad-frames wins)",
    )
    opt.add_argument("--seed", type=int, default=0)
    add_device(opt)
    add_precision(
        opt,
        old_amp=True,
        help="bf16 trains under bfloat16 autocast; auto: bf16 on a GPU, fp32 on a CPU",
    )
    opt.add_argument(
        "--no-resume",
        action="store_true",
        help="start over (OUT's checkpoint is replaced)",
    )
    p.set_defaults(func=run)


def _check_map_options(args: argparse.Namespace, streams: tuple[str, ...]) -> None:
    """``stpn`` reads both streams' maps; the map options belong to it alone."""
    if args.head != "stpn":
        if args.map_dim is not None or args.map_stride != 1:
            raise UsageError("--map-dim and --map-stride apply to --head stpn only")
        return
    if len(streams) != 2:
        raise UsageError(
            "--head stpn fuses the appearance and motion maps: give --streams both "
            f"(got {args.stream})"
        )
    if args.store is not None or args.reuse_features:
        raise UsageError(
            "--head stpn reads spatial maps, which neither --store's feature vectors nor "
            "--reuse-features provide: drop those options"
        )


def _steps(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(sorted(int(s) for s in text.split(",") if s.strip()))
    except ValueError as exc:
        raise UsageError(f"{option} must be comma-separated epochs, got {text!r}") from exc


def _settings(
    args: argparse.Namespace, milestones: dict[str, tuple[int, ...]], device: torch.device
) -> FinetuneSettings:
    """The optimisation options; bf16 autocast with ``--precision bf16``, or ``auto`` on CUDA."""
    from aggregator.finetune.loop import FinetuneSettings

    amp = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return FinetuneSettings(
        period=args.period,
        epochs=args.epochs,
        batch_videos=args.batch_videos,
        lr={"appearance": args.lr, "motion": args.motion_lr},
        milestones=milestones,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        grad_scale=args.grad_scale,
        chunk_size=args.chunk_size,
        checkpoint=args.checkpoint_activations,
        grad_frames=args.grad_frames,
        seed=args.seed,
        amp=amp,
    )


def _videos(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, str]]:
    """Video id -> path and video id -> label, from ``--videos`` and ``--labels``."""
    from extractor.sources import make_sources

    sources = make_sources(args.videos, labels=args.labels)
    if any(s.split is not None for s in sources) and args.train_split:
        sources = [s for s in sources if s.split == args.train_split]
        if not sources:
            raise UsageError(f"no video has split {args.train_split!r} in {args.labels!r}")
    paths = {s.video_id: Path(s.path) for s in sources}
    labels = {s.video_id: str(s.label) for s in sources if s.label is not None}
    unlabelled = sorted(set(paths) - set(labels))
    if unlabelled:
        raise UsageError(f"videos without a label: {unlabelled[:5]} (give --labels)")
    return paths, labels


def run(args: argparse.Namespace) -> int:
    positive: tuple[str, ...] = ("period", "epochs", "batch_videos", "chunk_size", "levels")
    positive += ("pyramids", "node_dim", "grad_frames", "map_dim", "map_stride")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be >= 1, got {args.max_frames}")

    apply_memory_budget(args.memory_budget)

    import torch

    from aggregator.finetune.job import reextract_dtype, run_finetune_job
    from aggregator.finetune.loop import distributed, init_distributed
    from aggregator.heads import HEADS as HEAD_CLASSES

    if args.head not in HEAD_CLASSES:
        raise UsageError(f"--head must be one of {sorted(HEAD_CLASSES)}, got {args.head!r}")
    streams = ("appearance", "motion") if args.stream == "both" else (args.stream,)
    _check_map_options(args, streams)
    head_kwargs = head_kwargs_from(args)
    if args.head == "tp":  # the run's config records the pyramid depth even when defaulted
        head_kwargs.setdefault("depth", 6)
    elif args.head == "tpp":
        head_kwargs.setdefault("levels", (1, 2, 4))

    if args.motion_weights is not None and "motion" not in streams:
        raise UsageError("--motion-weights given but the motion stream is not trained")
    milestones = {
        "appearance": _steps(args.lr_steps, "--lr-steps"),
        "motion": _steps(args.motion_lr_steps, "--motion-lr-steps"),
    }

    device = init_distributed(args.device)
    settings = _settings(args, milestones, device)
    paths, labels = _videos(args)
    out = Path(args.out)
    rank, world = distributed()
    history = run_finetune_job(
        paths,
        labels,
        out,
        backbone=backbone_spec_from(args, streams),
        settings=settings,
        head=args.head,
        head_kwargs=head_kwargs,
        device=device,
        store=args.store,
        cache_dir=args.cache_dir,
        max_frames=args.max_frames,
        resume=not args.no_resume,
        keep_inputs=args.keep_inputs,
        reuse_features=args.reuse_features,
        standardize=not args.no_standardize,
        map_dim=args.map_dim,
        map_stride=args.map_stride,
    )
    files = {s: out / f"backbone_{s}.pt" for s in streams}
    if rank == 0:
        last = history[-1] if history else None
        if last is not None:
            print(
                f"{len(paths)} videos, {last['epoch']} epochs, K={args.period}: loss "
                f"{last['loss']:.4f}, accuracy {last['accuracy']:.3f}"
            )
        print(backward_chunks_line(out))
        names = [p.name for p in files.values()]
        print(f"wrote {out}: " + ", ".join([*names, "head.pt", "config.json", "metrics.json"]))
        print(f"re-extract: {reextract_command(args, files, streams, reextract_dtype(out))}")
    status = 0
    if args.reextract is not None:
        if world > 1:
            torch.distributed.barrier()  # rank 0 has written the backbones
        status = _reextract(args, files, streams, str(device), reextract_dtype(out))
    if world > 1:
        torch.distributed.destroy_process_group()
    return status


def backward_chunks_line(out: Path) -> str:
    """What the run recorded of its backward chunks, as one line."""
    import json

    config = out / "config.json"
    chunks = json.loads(config.read_text()).get("backward_chunks") if config.is_file() else None
    if not isinstance(chunks, dict):
        return "frames with gradient per backward chunk: not recorded"
    line = f"frames with gradient per backward chunk: {chunks['grad_frames']}"
    if chunks.get("chosen_by") == "memory_budget":
        per_frame = chunks["activation_bytes_per_frame"]
        line += (
            f" (chosen from the memory budget {chunks['memory_budget'] / 2**30:.2f} GiB; "
            + ", ".join(f"{s} {b / 2**20:.0f} MiB" for s, b in per_frame.items())
            + " of activations per frame)"
        )
    else:
        line += " (--grad-frames)"
    return line


def _weights_options(files: dict[str, Path]) -> tuple[Path, Path | None]:
    """``(--weights, --motion-weights)`` for ``framepool extract`` with the tuned backbones."""
    return files.get("appearance", files.get("motion", Path())), files.get("motion")


def reextract_command(
    args: argparse.Namespace, files: dict[str, Path], streams: tuple[str, ...], dtype: str
) -> str:
    """The ``framepool extract`` command line that re-extracts a store with the tuned backbones
    (with the dtype recorded in the run's config, which a store must match to use its head)."""
    weights, motion = _weights_options(files)
    cmd = (
        f"framepool extract VIDEOS --store NEW_STORE --streams {','.join(streams)} "
        f"--arch {args.arch} --precision {_PRECISION_OF_DTYPE.get(dtype, dtype)} "
        f"--weights {weights}"
    )
    if args.head == "stpn":
        cmd = cmd.replace(
            f"--streams {','.join(streams)}",
            "--streams appearance,motion,appearance_map,motion_map",
        )
        if args.map_dim is not None:
            cmd += f" --map-dim {args.map_dim}"
        if args.map_stride != 1:
            cmd += f" --map-stride {args.map_stride}"
    if motion is not None:
        cmd += f" --motion-weights {motion} --flow {args.flow}"
    return cmd


def _reextract(
    args: argparse.Namespace,
    files: dict[str, Path],
    streams: tuple[str, ...],
    device: str,
    dtype: str,
) -> int:
    from extractor.pipeline import run_extract

    weights, motion = _weights_options(files)
    spec = backbone_spec_from(args, streams, dtype=dtype, weights=weights, motion_weights=motion)
    maps: dict[str, Any] = {}
    if args.head == "stpn":
        maps = {"maps": ["appearance_map", "motion_map"], "map_dim": args.map_dim}
        maps["map_stride"] = args.map_stride
    summary = run_extract(
        args.videos,
        args.reextract,
        spec,
        labels=args.labels,
        device=device,
        max_frames=args.max_frames,
        progress=False,
        **maps,
    )
    print(summary.format())
    return 0 if summary.ok else 1
