"""The ``stpn`` head on spatial maps: accuracy where only maps help, storage, time per epoch.

Three parts, each printed as a markdown table with wall seconds, CPU seconds and peak RSS:

1. **location task** (:mod:`aggregator.maps.synthetic`): the class is the quadrant of the frame
   where the motion is; pooled vectors carry no trace of it. ``stpn`` (STPN's three pathways,
   and with the fused pathway) against ``stcb`` and ``tp`` on the pooled streams of the same store,
   all through :func:`aggregator.trainers.train`.
2. **extraction** with and without map streams on real clips (``--videos``): frames/s and stored
   bytes per frame, and what that makes for UCF101 (13,320 clips, ``--ucf-frames`` frames).
3. **time per epoch** of ``stpn`` at UCF101 scale (9,537 training videos of split 1, maps of
   ``--map-dim`` channels on a 7 x 7 grid every ``--map-stride`` frames of ``--mean-frames``-frame
   videos), synthetic maps in memory: ``--batches`` batches are timed and the epoch is their mean
   time times the number of batches.

    python benchmarks/stpn.py --parts task,extract,epoch
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aggregator.heads import build_model
from aggregator.maps.synthetic import LocationTask, write_location_store
from aggregator.train_loop import fit_epoch, param_groups
from aggregator.trainers import train

REPO = Path(__file__).resolve().parents[1]
VIDEOS = REPO.parent / "shared" / "data" / "videos"
UCF_CLIPS, UCF_TRAIN = 13_320, 9_537


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------- 1. the task
def part_task(args: argparse.Namespace, work: Path) -> None:
    task = LocationTask(grid=args.grid, channels=args.channels, frames=(4, 8))
    store = work / "location.zarr"
    write_location_store(
        store, train_per_class=args.train_per_class, test_per_class=args.test_per_class, task=task
    )
    stpn_kw = {"out_dim": 1024, "temporal_dim": 128, "attention_dim": 64}
    runs: list[tuple[str, str, list[str], dict[str, Any]]] = [
        ("tp", "tp", ["appearance", "motion"], {"depth": 3}),
        ("stcb", "stcb", ["appearance", "motion"], {"out_dim": 1024}),
        ("stpn (seed: spatial, temporal, attended)", "stpn", [], stpn_kw),
        (
            "stpn + fused pathway",
            "stpn",
            [],
            {**stpn_kw, "pathways": ("spatial", "temporal", "attended", "fused")},
        ),
    ]
    print(
        f"\nLocation task: 4 classes (quadrant of the moving cell), {args.grid}x{args.grid} maps, "
        f"C = {args.channels}, 4-8 frames, {4 * args.train_per_class} training videos (10% of "
        f"them held out for model selection), {4 * args.test_per_class} test videos, "
        f"{args.epochs} epochs, batch 16, Adam 1e-3, seed 0; chance 25%\n"
    )
    print("| head | streams | test top-1 | wall s | CPU s | peak RSS MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, head, streams, kw in runs:
        out = work / f"run-{head}-{len(kw)}"
        metrics, wall, cpu = timed(
            lambda head=head, streams=streams, kw=kw, out=out: train(
                store,
                out,
                head=head,
                **({"streams": streams} if streams else {}),
                head_kwargs=kw,
                epochs=args.epochs,
                batch_size=16,
                patience=None,
                threads=args.threads,
                make_plots=False,
            )
        )
        shown = ", ".join(streams) if streams else "appearance_map, motion_map"
        print(
            f"| {name} | {shown} | {100 * metrics['top1']:.1f}% | {wall:.0f} | {cpu:.0f} | "
            f"{peak_rss_mib():.0f} |",
            flush=True,
        )


# ----------------------------------------------------------------------------------- 2. extract
def part_extract(args: argparse.Namespace, work: Path) -> None:
    from extractor.pipeline import run_extract
    from extractor.spec import BackboneSpec

    videos = [VIDEOS / v for v in args.videos.split(",")]
    configs: list[tuple[str, dict[str, Any]]] = [
        ("pooled vectors only", {"maps": []}),
        ("+ maps, full C, every frame", {"maps": MAPS}),
        (
            f"+ maps, C = {args.map_dim}, every {args.map_stride}th frame",
            {"maps": MAPS, "map_dim": args.map_dim,
             "map_stride": args.map_stride},
        ),
    ]  # fmt: skip
    print(
        f"\nExtraction: {args.arch}, random weights, float32, DIS flow, {len(videos)} real clips "
        f"({args.extract_frames} frames each), batch 16, 2 workers; bytes on disk in the store\n"
    )
    print(
        "| streams | frames/s | bytes/frame (all streams) | UCF101 store | wall s | CPU s "
        "| peak RSS MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, kw in configs:
        store = work / f"extract-{len(kw)}-{len(kw['maps'])}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        summary, wall, cpu = timed(
            lambda store=store, kw=kw: run_extract(
                videos,
                store,
                BackboneSpec(weights="random", arch=args.arch, dtype="float32"),
                device="cpu",
                batch_size=16,
                workers=2,
                max_frames=args.extract_frames,
                progress=False,
                **kw,
            )
        )
        assert summary.ok, summary.format()
        per_frame = dir_bytes(store) / summary.frames
        ucf = per_frame * UCF_CLIPS * args.ucf_frames
        print(
            f"| {name} | {summary.frames / summary.seconds:.2f} | {per_frame:,.0f} | "
            f"{ucf / 1e9:,.1f} GB | {wall:.0f} | {cpu:.0f} | {peak_rss_mib():.0f} |",
            flush=True,
        )


MAPS = ["appearance_map", "motion_map"]


# ----------------------------------------------------------------------------------- 3. epoch
def part_epoch(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    frames = math.ceil(args.mean_frames / args.map_stride)
    c = args.map_dim
    model = build_model("stpn", in_features=dict.fromkeys(MAPS, c), num_classes=101)
    opt = torch.optim.Adam(param_groups(model, 1e-3, 1e-4, 1.0), lr=1e-3)
    b = args.batch_size
    gen = torch.Generator().manual_seed(1)
    x = {s: torch.randn(b, frames, 7, 7, c, generator=gen) for s in MAPS}
    lengths = torch.randint(max(1, frames // 2), frames + 1, (b,), generator=gen)
    lengths[0] = frames
    y = torch.randint(101, (b,), generator=gen)
    batches = [((x, lengths), y)] * args.batches
    fit_epoch(model, batches[:1], opt)  # warm-up
    _, wall, cpu = timed(lambda: fit_epoch(model, batches, opt))
    n_batches = math.ceil(UCF_TRAIN / b)
    print(
        f"\nstpn time per epoch at UCF101 scale: {UCF_TRAIN} training videos, {frames} map frames "
        f"at most ({args.mean_frames}-frame videos, stride {args.map_stride}), 7x7 x C = {c}, "
        f"defaults (out_dim 4096, temporal_dim 4096, attention_dim 512, 3x3 conv to 64), "
        f"batch {b}; {args.batches} batches timed, epoch = {n_batches} batches\n"
    )
    print(
        "| per batch wall s | per batch CPU s | epoch wall (extrapolated) | "
        "epoch CPU (extrapolated) | peak RSS MiB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    per, per_cpu = wall / args.batches, cpu / args.batches
    print(
        f"| {per:.2f} | {per_cpu:.2f} | {per * n_batches / 60:.1f} min | "
        f"{per_cpu * n_batches / 60:.1f} CPU min | {peak_rss_mib():.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="task,extract,epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=int, default=5)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--videos", default="mm_part_0.mp4,tu_v_Basketball_g01_c01.avi")
    p.add_argument("--extract-frames", type=int, default=16)
    p.add_argument("--arch", default="resnet101")
    p.add_argument("--ucf-frames", type=int, default=186, help="mean frames per UCF101 clip")
    p.add_argument("--map-dim", type=int, default=256)
    p.add_argument("--map-stride", type=int, default=8)
    p.add_argument("--mean-frames", type=int, default=186)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__}, {args.threads} threads"
    )
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="stpn-bench-") as tmp:
        work = Path(tmp)
        if "task" in parts:
            part_task(args, work)
        if "extract" in parts:
            part_extract(args, work)
        if "epoch" in parts:
            part_epoch(args)


if __name__ == "__main__":
    main()
