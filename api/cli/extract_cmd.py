"""``framepool extract``: per-frame appearance and motion features of videos into a store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from api.cli import UsageError
from extractor.backbones import ARCHS, STREAMS
from extractor.decode_torchcodec import DECODERS
from extractor.flow import FLOW_BACKENDS, RAFT_DTYPES
from extractor.pipeline import ExtractionSummary, run_extract
from extractor.sharding import parse_shard

__all__ = ["register", "run", "run_extract"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="extract per-frame features of videos into a store",
        description=(
            "Decode every frame of every video, compute ResNet appearance features (RGB frame) and "
            "motion features (a stack of 10 optical-flow fields) per frame, and write them to a "
            "Zarr store. Resumable: complete videos are skipped, unfinished and failed ones redone."
        ),
    )
    p.add_argument(
        "inputs", nargs="+", metavar="VIDEO_OR_DIR_OR_LIST", help="video files, folders, .txt lists"
    )
    p.add_argument("--store", required=True, help="feature store path or fsspec URL")
    p.add_argument("--labels", help="CSV with columns path,label[,split] (default: parent folder)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--streams", default=",".join(STREAMS), help="comma-separated: appearance,motion"
    )
    g.add_argument("--flow", default="dis", choices=FLOW_BACKENDS, help="optical flow backend")
    g.add_argument("--flow-weights", help="RAFT weights file (for --flow raft)")
    g.add_argument(
        "--flow-dtype",
        choices=RAFT_DTYPES,
        help="RAFT compute dtype (for --flow raft; default float32)",
    )
    g.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (torchvision's cache), random (seeded), or a state-dict PATH",
    )
    g.add_argument(
        "--motion-weights",
        help="motion backbone weights (default: --weights; a 3-channel conv1 is "
        "cross-modality initialised)",
    )
    g.add_argument("--arch", default="resnet101", choices=sorted(ARCHS))
    g.add_argument(
        "--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help="compute dtype"
    )
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--batch-size", type=_positive, default=32, help="frames per model batch")
    r.add_argument("--workers", type=_positive, default=2, help="video preparation threads")
    r.add_argument(
        "--decoder",
        default="auto",
        choices=DECODERS,
        help="auto: torchcodec (NVDEC) when the device is CUDA, else PyAV",
    )
    r.add_argument("--shard", help="I/N: extract only shard I (0-based) of N")
    r.add_argument("--stride", type=_positive, default=1, help="keep every N-th frame")
    r.add_argument("--max-frames", type=_positive, help="keep at most N frames, evenly spaced")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _streams(text: str) -> list[str]:
    streams = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in streams if s not in STREAMS]
    if not streams or bad or len(set(streams)) != len(streams):
        raise UsageError(f"--streams must list some of {list(STREAMS)}, got {text!r}")
    return streams


def run(args: argparse.Namespace) -> int:
    streams = _streams(args.streams)
    shard = None
    if args.shard is not None:
        try:
            shard = parse_shard(args.shard)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.flow_dtype is not None and args.flow != "raft":
        raise UsageError("--flow-dtype is only used with --flow raft")
    if args.flow_weights is not None and args.flow != "raft":
        raise UsageError("--flow-weights is only used with --flow raft")
    if args.flow == "raft" and args.flow_weights is None and "motion" in streams:
        raise UsageError(
            "--flow raft needs --flow-weights PATH (RAFT weights are never downloaded)"
        )
    summary = run_extract(
        args.inputs,
        args.store,
        labels=args.labels,
        streams=streams,
        flow=args.flow,
        flow_weights=args.flow_weights,
        weights=args.weights,
        motion_weights=args.motion_weights,
        arch=args.arch,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        workers=args.workers,
        shard=shard,
        stride=args.stride,
        max_frames=args.max_frames,
        progress=not args.no_progress and sys.stderr.isatty(),
        decoder=args.decoder,
        flow_params={"dtype": args.flow_dtype} if args.flow_dtype else None,
    )
    print(summary.format())
    return exit_status(summary)


def exit_status(summary: ExtractionSummary) -> int:
    """0 when every video of this run is complete, 1 when some failed."""
    return 0 if summary.ok else 1
