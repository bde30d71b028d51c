"""``framepool extract``: per-frame appearance and motion features of videos into a store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.cli import UsageError
from api.cli.options import (
    PRECISION_DTYPES,
    VIDEO_EXTENSIONS,
    Deprecated,
    add_backbone,
    add_device,
    add_labels,
    add_precision,
    add_store,
    add_streams,
    backbone_spec_from,
    non_negative_float,
    positive_int,
    stream_list,
)
from extractor.spec import MAP_STREAMS  # spatial maps of the pooled streams; nothing heavy

if TYPE_CHECKING:
    from extractor.ray_engine import RayOptions
    from extractor.records import ExtractionSummary

__all__ = ["register", "run"]


DEFAULT_STREAMS = "appearance,motion"


def _extract_streams(text: str) -> str:
    """The pooled streams (as :func:`stream_list` reads them) and any map streams."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    maps = [s for s in parts if s in MAP_STREAMS]
    rest = ",".join(s for s in parts if s not in MAP_STREAMS)
    if len(set(maps)) != len(maps):
        raise argparse.ArgumentTypeError(f"a map stream is repeated in {text}")
    if not rest and maps:
        return ",".join(maps)
    try:
        return ",".join([*stream_list(rest), *maps])
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected appearance, motion, appearance,motion or both, and optionally "
            f"appearance_map, motion_map; got {text}"
        ) from None


DECODERS = ("auto", "pyav", "torchcodec")  # extractor.decode_torchcodec.DECODERS, without torch
ENGINES = ("local", "ray")  # extractor.pipeline.ENGINES, without torch
RAY_FLAGS = {
    "ray_address": "address",
    "model_actors": "model_actors",
    "model_gpus": "model_gpus",
    "model_cpus": "model_cpus",
    "prepare_cpus": "prepare_cpus",
    "prepare_tasks": "prepare_tasks",
    "videos_per_call": "videos_per_call",
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="extract per-frame features of videos into a store",
        description=(
            "Decode every frame of every video, compute ResNet appearance features (RGB frame) and "
            "motion features (a stack of 10 optical-flow fields) per frame, and write them to a "
            "Zarr store. Resumable: complete videos are skipped, unfinished and failed ones redone."
            f"\n\nFolders are searched for {', '.join(VIDEO_EXTENSIONS)} files; a .txt file lists "
            "one video path per line."
        ),
    )
    p.add_argument(
        "inputs", nargs="+", metavar="VIDEO_OR_DIR_OR_LIST", help="video files, folders, .txt lists"
    )
    add_store(p)
    add_labels(p)
    g = p.add_argument_group("model")
    add_streams(
        g,
        default=DEFAULT_STREAMS,
        type=str,
        help="appearance, motion, or both (appearance,motion); add appearance_map, motion_map "
        "for the spatial maps of the last conv block",
        old_stream=False,
    )
    add_backbone(g, timm=True)
    g.add_argument(
        "--flow-precision",
        choices=("fp32", "bf16"),
        help="RAFT compute precision (for --flow raft; default fp32)",
    )
    add_precision(g, old_dtype=True)
    r = p.add_argument_group("run")
    add_device(r)
    r.add_argument("--batch-size", type=positive_int, default=32, help="frames per model batch")
    r.add_argument(
        "--decode-workers",
        dest="decode_workers",
        type=positive_int,
        default=2,
        help="threads that decode and prepare videos",
    )
    r.add_argument(
        "--workers",
        dest="decode_workers",
        action=Deprecated,
        new="--decode-workers",
        convert=lambda t: positive_int(t),
    )
    r.add_argument(
        "--decoder",
        default="auto",
        choices=DECODERS,
        help="auto: torchcodec (NVDEC) when the device is CUDA, else PyAV",
    )
    r.add_argument("--shard", help="I/N: extract only shard I (0-based) of N")
    r.add_argument("--stride", type=positive_int, default=1, help="keep every N-th frame")
    r.add_argument("--max-frames", type=positive_int, help="keep at most N frames, evenly spaced")
    r.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    r.add_argument(
        "--progress-interval",
        type=non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (a bar is shown "
        "on a terminal)",
    )
    r.add_argument(
        "--fps",
        type=_positive_float,
        dest="sample_fps",
        help="keep, for each instant k/F seconds from the first frame, the frame shown then "
        "(by presentation time: right on variable frame rates); replaces --stride/--max-frames",
    )
    r.add_argument(
        "--window-stride",
        type=positive_int,
        help="--arch hf:<model>: kept frames between window starts (default: the model's "
        "frames per window)",
    )
    e = p.add_argument_group(
        "engine (--engine ray: a Ray Data pipeline on a cluster; pip install 'framepool[ray]')"
    )
    e.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (default); ray: CPU tasks decode, model actors embed, "
        "tasks write, across a Ray cluster",
    )
    e.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster to join (HOST:PORT, ray://HOST:PORT, auto); default: RAY_ADDRESS, "
        "else a Ray instance on this machine",
    )
    e.add_argument(
        "--model-actors", type=positive_int, help="model actors (default: one per GPU, or per node)"
    )
    e.add_argument(
        "--model-gpus", type=non_negative_float, help="GPUs per model actor (default 1 with GPUs)"
    )
    e.add_argument("--model-cpus", type=non_negative_float, help="CPUs per model actor (default 1)")
    e.add_argument(
        "--prepare-cpus", type=non_negative_float, help="CPUs per decoding task (default 1)"
    )
    e.add_argument(
        "--prepare-tasks",
        type=positive_int,
        help="decoding tasks at once (default: as many as the cluster holds)",
    )
    e.add_argument(
        "--videos-per-call",
        type=positive_int,
        help="videos handed to a model actor at once (default 4)",
    )
    m = p.add_argument_group("spatial maps (--streams ...,appearance_map,motion_map)")
    m.add_argument(
        "--map-dim", type=positive_int, help="reduce map channels to N by a seeded projection"
    )
    m.add_argument(
        "--map-stride", type=positive_int, default=1, help="keep the maps of every N-th frame"
    )
    m.add_argument("--map-seed", type=int, default=0, help="seed of the map projection")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    streams = _streams(args)
    shard = _shard(args)
    _check_options(args, streams)
    ray_options = _ray_options(args)
    check_before_models(args)
    from extractor.pipeline import run_extract

    pooled = [s for s in streams if s not in MAP_STREAMS]
    spec = backbone_spec_from(args, pooled, dtype=PRECISION_DTYPES[args.precision])
    progress = not args.no_progress
    summary = run_extract(
        args.inputs,
        args.store,
        spec,
        maps=[s for s in streams if s in MAP_STREAMS],
        labels=args.labels,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.decode_workers,
        shard=shard,
        stride=args.stride,
        max_frames=args.max_frames,
        progress=progress,
        progress_interval=args.progress_interval,
        map_dim=args.map_dim,
        map_stride=args.map_stride,
        map_seed=args.map_seed,
        decoder=args.decoder,
        sample_fps=args.sample_fps,
        window_stride=args.window_stride,
        engine=args.engine,
        ray=ray_options,
    )
    print(summary.format())
    return exit_status(summary)


def _streams(args: argparse.Namespace) -> list[str]:
    """The streams ``--streams`` asks for (appearance alone for a window backbone)."""
    try:
        streams = _extract_streams(args.streams).split(",")
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--streams: {exc}") from None
    if args.arch.startswith("hf:"):
        if args.streams == DEFAULT_STREAMS:  # a window backbone computes appearance alone
            streams = ["appearance"]
        elif streams != ["appearance"]:
            raise UsageError(f"--arch {args.arch} computes the appearance stream only")
        if args.stride != 1 or args.max_frames is not None:
            raise UsageError(f"--arch {args.arch}: windows cover every frame; use --fps to sample")
    elif args.window_stride is not None:
        raise UsageError("--window-stride applies to --arch hf:<model> only")
    return streams


def _shard(args: argparse.Namespace) -> tuple[int, int] | None:
    from extractor.sharding import parse_shard

    if args.shard is None:
        return None
    try:
        return parse_shard(args.shard)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_options(args: argparse.Namespace, streams: list[str]) -> None:
    """Usage errors of options given together that do not go together."""
    if args.flow_precision is not None and args.flow != "raft":
        raise UsageError("--flow-precision is only used with --flow raft")
    if args.flow_weights is not None and args.flow != "raft":
        raise UsageError("--flow-weights is only used with --flow raft")
    if args.flow == "raft" and args.flow_weights is None and "motion" in streams:
        raise UsageError(
            "--flow raft needs --flow-weights PATH (RAFT weights are never downloaded)"
        )
    if not any(s in MAP_STREAMS for s in streams) and (
        args.map_dim is not None or args.map_stride != 1
    ):
        raise UsageError("--map-dim and --map-stride need a map stream in --streams")
    if args.sample_fps is not None and (args.stride != 1 or args.max_frames is not None):
        raise UsageError("--fps replaces --stride and --max-frames: give one or the other")


def _ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The Ray engine's options from its flags (which apply with ``--engine ray`` only)."""
    given = {flag: getattr(args, flag) for flag in RAY_FLAGS if getattr(args, flag) is not None}
    if args.engine != "ray" and given:
        names = ", ".join("--" + f.replace("_", "-") for f in given)
        raise UsageError(f"{names} apply only with --engine ray")
    if args.engine != "ray":
        return None
    import importlib.util

    from extractor.ray_engine import RAY_MISSING, RayOptions

    if importlib.util.find_spec("ray") is None:
        raise UsageError(RAY_MISSING)
    return RayOptions(
        **{RAY_FLAGS[flag]: value for flag, value in given.items()},
        verbose=args.verbose > 0,
    )


def check_before_models(args: argparse.Namespace) -> None:
    """What can be wrong with the inputs, labels, weights files and store, checked before torch
    and the models load: a missing video path or labels row, or a store path that is a file or
    someone's folder, is a usage error (FileNotFoundError, ValueError) naming them all."""
    from extractor.sources import make_sources
    from storage.root import check_store_path

    check_store_path(args.store)
    for option, value in (
        ("--weights", args.weights),
        ("--motion-weights", args.motion_weights),
        ("--flow-weights", args.flow_weights),
    ):
        if value is not None and value not in ("imagenet", "random") and not Path(value).exists():
            raise UsageError(f"{option} {value}: no such file")
    make_sources(args.inputs, labels=args.labels)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def exit_status(summary: ExtractionSummary) -> int:
    """0 when every video of this run is complete, 1 when some failed."""
    return 0 if summary.ok else 1
