"""Extraction throughput: the framepool pipeline vs a naive per-frame loop vs the model alone.

Per stream, frames per second on real clips for

(a) ``framepool extract``'s pipeline (``run_extraction`` into a temporary store: decode, resize,
    flow in worker threads, batched model in bfloat16 where supported, writer thread);
(b) a naive loop as commonly written: decode in the main thread, PIL transforms, the model on one
    frame at a time in float32 (for motion: all flows first, then one stack per frame);
(c) the model alone on random input of the pipeline's batch size and dtype (the ceiling).

Prints a markdown table with (a)/(b) and (a)/(c). Optionally (``--compare-workers``) times the
preparation stage alone with threads and with processes. Example::

    python benchmarks/extract.py --arch resnet101 --frames 270 --naive-frames 24
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extractor.backbones import build_backbone
from extractor.decode import count_frames, iter_frames
from extractor.features import FeatureExtractor
from extractor.flow import make_flow
from extractor.pipeline import run_extraction
from extractor.prepare import FrameChunk, prepare_video
from extractor.sources import make_sources
from extractor.transforms import STACK_LENGTH, quantize_flow

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEOS = REPO.parent / "shared" / "data" / "videos"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pick_clips(folder: Path, frames: int) -> list[tuple[Path, int]]:
    """Whole clips, shortest first, until adding one more would pass ``frames``."""
    clips = sorted(
        (count_frames(p), p)
        for p in folder.iterdir()
        if p.suffix.lower() in {".mp4", ".avi", ".mkv", ".mov", ".webm"}
    )
    out: list[tuple[Path, int]] = []
    total = 0
    for n, p in clips:
        if total + n > frames and out:
            break
        out.append((p, n))
        total += n
    return out


# ----------------------------------------------------------------------------- (b) naive loop
def _pil_crop(frame: np.ndarray) -> Image.Image:
    img = Image.fromarray(frame)
    w, h = img.size
    nw, nh = (int(256 * w / h), 256) if h <= w else (256, int(256 * h / w))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = round((nw - 224) / 2), round((nh - 224) / 2)
    return img.crop((left, top, left + 224, top + 224))


def naive_appearance(model: torch.nn.Module, clips: Sequence[Path], limit: int) -> int:
    n = 0
    for clip in clips:
        for frame in iter_frames(clip):
            x = (np.asarray(_pil_crop(frame), dtype=np.float32) / 255.0 - MEAN) / STD
            t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
            with torch.no_grad():
                model(t).numpy()
            n += 1
            if n >= limit:
                return n
    return n


def naive_motion(model: torch.nn.Module, clips: Sequence[Path], limit: int) -> int:
    flow = make_flow("dis")
    n = 0
    for clip in clips:
        frames = list(iter_frames(clip))[: limit - n + STACK_LENGTH]
        grays = []
        for frame in frames:
            img = Image.fromarray(frame)
            w, h = img.size
            nw, nh = (int(256 * w / h), 256) if h <= w else (256, int(256 * h / w))
            grays.append(np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR).convert("L")))
        top, left = round((grays[0].shape[0] - 224) / 2), round((grays[0].shape[1] - 224) / 2)
        fields = []
        for a, b in itertools.pairwise(grays):
            f = flow(a, b)[top : top + 224, left : left + 224]
            fields.append(quantize_flow(f))
        if not fields:
            fields = [np.full((224, 224, 2), 128, np.uint8)]
        for t in range(len(frames)):
            chans = []
            for j in range(STACK_LENGTH):
                field = fields[min(t + j, len(fields) - 1)]
                chans += [field[:, :, 0], field[:, :, 1]]
            x = (np.stack(chans).astype(np.float32) / 255.0 - 0.5) / 0.226
            with torch.no_grad():
                model(torch.from_numpy(x)[None]).numpy()
            n += 1
            if n >= limit:
                return n
    return n


# ----------------------------------------------------------------------------- (c) model alone
def model_alone(fx: FeatureExtractor, streams: Sequence[str], n_batches: int) -> float:
    """Frames per second of the backbones alone (all of ``streams`` per frame)."""
    b = fx.batch_size
    dtype = torch.bfloat16 if fx.dtype == "bfloat16" else torch.float32
    inputs = {
        "appearance": torch.randn(b, 3, 224, 224).contiguous(memory_format=torch.channels_last),
        "motion": torch.randn(b, 20, 224, 224).contiguous(memory_format=torch.channels_last),
    }
    inputs = {k: v.to(dtype) for k, v in inputs.items()}

    def step() -> None:
        with torch.inference_mode():
            for s in streams:
                fx.models[s](inputs[s]).float()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(n_batches):
        step()
    return n_batches * b / (time.perf_counter() - start)


def timed(fn: Callable[[], int]) -> float:
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- threads vs processes
def _prepare_all(path: str) -> tuple[int, int]:
    flow = make_flow("dis")
    n = nbytes = 0
    for item in prepare_video(path, flow=flow):
        if isinstance(item, FrameChunk):
            n += len(item)
            nbytes += item.motion.nbytes + item.appearance.nbytes  # type: ignore[union-attr]
    return n, nbytes


def _prepare_return(path: str) -> list[FrameChunk]:
    flow = make_flow("dis")
    return [c for c in prepare_video(path, flow=flow) if isinstance(c, FrameChunk)]


def compare_workers(clips: Sequence[Path], workers: int) -> dict[str, float]:
    total = sum(count_frames(c) for c in clips)
    out = {}
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as ex:
        list(ex.map(_prepare_all, map(str, clips)))
    out["threads"] = total / (time.perf_counter() - start)
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(workers) as ex:  # the prepared inputs come back, as they must
        list(ex.map(_prepare_return, map(str, clips)))
    out["processes"] = total / (time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--videos", type=Path, default=DEFAULT_VIDEOS, help="folder of real clips")
    p.add_argument("--arch", default="resnet101", choices=("resnet18", "resnet50", "resnet101"))
    p.add_argument("--frames", type=int, default=270, help="frames for the pipeline (whole clips)")
    p.add_argument("--naive-frames", type=int, default=24, help="frames for the naive loop")
    p.add_argument("--streams", default="appearance,motion")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--model-batches", type=int, default=4, help="batches timed for (c)")
    p.add_argument("--repeats", type=int, default=2, help="best of N, interleaved")
    p.add_argument("--compare-workers", action="store_true", help="threads vs processes")
    args = p.parse_args()
    streams = [s for s in args.streams.split(",") if s]

    clips = pick_clips(args.videos, args.frames)
    paths = [c for c, _ in clips]
    n_frames = sum(n for _, n in clips)
    load_before = os.getloadavg()
    kinds = [*streams, "both"] if len(streams) > 1 else streams
    extractors = {
        k: FeatureExtractor(
            streams=streams if k == "both" else [k],
            weights="random",
            arch=args.arch,
            device="cpu",
            batch_size=args.batch_size,
            dtype=args.dtype,
        )
        for k in kinds
    }
    naive_models = {k: build_backbone(k, "random", args.arch) for k in streams}  # fp32, with BN
    nan = float("nan")
    best = {k: [nan, nan, nan] for k in kinds}  # (a), (b), (c): best of the repeats
    for _ in range(args.repeats):  # interleaved, so that a burst of other work hits all columns
        for k in kinds:
            fx = extractors[k]
            c = model_alone(fx, fx.streams, args.model_batches)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = run_extraction(
                    make_sources(paths), Path(tmp) / "s", fx, workers=args.workers, progress=False
                )
                a = summary.frames / (time.perf_counter() - start)
                assert summary.ok and summary.frames == n_frames, summary.format()
            b = nan
            if k != "both":
                run = naive_appearance if k == "appearance" else naive_motion
                b = timed(partial(run, naive_models[k], paths, args.naive_frames))
            best[k] = [
                max(old, new) if old == old else new
                for old, new in zip(best[k], (a, b, c), strict=True)
            ]
    rows = [(k, extractors[k].dtype, *best[k]) for k in kinds]
    load_after = os.getloadavg()

    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (a shared machine: other work slows every column)"
    )
    print(
        f"Best of {args.repeats} interleaved repeats. "
        f"Clips: {len(paths)} real clips, {n_frames} frames for (a); {args.naive_frames} frames "
        f"for (b); {args.model_batches} batches of {args.batch_size} for (c); arch {args.arch}, "
        f"flow dis, {args.workers} worker threads\n"
    )
    print("| stream | dtype | (a) pipeline fps | (b) naive loop fps | (c) model alone fps "
          "| (a)/(b) | (a)/(c) |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for stream, dtype, a, b, c in rows:
        ab = f"{a / b:.2f}x" if b == b else "-"
        bs = f"{b:.1f}" if b == b else "-"
        print(f"| {stream} | {dtype} | {a:.1f} | {bs} | {c:.1f} | {ab} | {a / c:.0%} |")
    if args.compare_workers:
        res = compare_workers(paths, args.workers)
        print(f"\nPreparation only (decode, resize, DIS flow, stacks), {args.workers} workers:\n")
        print("| workers | frames/s |\n| --- | ---: |")
        for kind, fps in res.items():
            print(f"| {kind} | {fps:.1f} |")


if __name__ == "__main__":
    main()
