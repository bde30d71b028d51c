"""Extraction throughput: the framepool pipeline vs a naive per-frame loop vs the model alone.

Per stream (appearance, motion, both), frames per second on real clips for

(a) ``framepool extract``'s pipeline (``run_extraction`` into a temporary store: decode, resize,
    flow in worker threads, batched model in bfloat16 where supported, writer thread), with the
    wall and CPU seconds of the run and, on a CUDA device, the GPU utilisation sampled during it;
(b) a naive loop as commonly written: decode in the main thread, PIL transforms, the model on one
    frame at a time in float32 (for motion: all flows first, then one stack per frame); CPU only;
(c) the model alone on random input of the pipeline's batch size and dtype (the ceiling).

Also the decode rate alone (the chosen decoder, ``--workers`` threads, every frame of the same
clips). ``--device cuda`` runs on a GPU (``--decoder auto`` then decodes with NVDEC), ``--flow
raft`` computes the motion stream's flow with RAFT (``--raft-weights`` or random raft_large /
raft_small weights: the same speed), ``--loops N`` repeats the clip list N times (enough frames
to keep a GPU busy). Prints a markdown table with (a)/(b) and (a)/(c). Optionally
(``--compare-workers``) times the preparation stage alone with threads and with processes::

    python benchmarks/extract.py --arch resnet101 --frames 270 --naive-frames 24
    python benchmarks/extract.py --device cuda --frames 2500 --loops 4 --naive-frames 0 \
        --batch-size 128 --workers 8 --flow raft --raft-model small

``--engine ray`` compares instead ``--engine ray`` (a Ray instance started on this machine) with
``--engine local`` on the same clips in one run (:mod:`ray_compare`): the throughput ratio, a
table of 1, 2, 4 workers on a flow-bound setting (motion only), and the peak RSS of the driver
and of each kind of Ray worker::

    python benchmarks/extract.py --engine ray --arch resnet18 --frames 400
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _model_alone import model_alone, sync
from PIL import Image

from extractor.backbones import build_backbone
from extractor.decode import count_frames, iter_frames
from extractor.decode_torchcodec import DECODERS, make_frame_reader, resolve_decoder
from extractor.features import FeatureExtractor
from extractor.flow import make_flow
from extractor.pipeline import run_extraction
from extractor.prepare import FrameChunk, prepare_video
from extractor.sources import make_sources
from extractor.spec import BackboneSpec
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
# ----------------------------------------------------------------------------- GPU, decode rate
class GpuSampler(threading.Thread):
    """Samples the GPU's utilisation (%) every ``period`` s: NVML through torch, else nvidia-smi."""

    def __init__(self, device: torch.device, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.device, self.period = device, period
        self.samples: list[float] = []
        self.source = "n/a"
        self._stop_event = threading.Event()

    def _read(self) -> float | None:
        try:
            value = float(torch.cuda.utilization(self.device))
            self.source = "NVML"
            return value
        except Exception:  # no pynvml: ask nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None
        index = self.device.index if self.device.index is not None else 0
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             f"--id={index}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        try:
            value = float(res.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None
        self.source = "nvidia-smi"
        return value

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            v = self._read()
            if v is None:
                return
            self.samples.append(v)

    def stop(self) -> str:
        self._stop_event.set()
        self.join()
        if not self.samples:
            return "n/a"
        return f"{np.mean(self.samples):.0f}% (max {max(self.samples):.0f}%)"


def decode_rate(clips: Sequence[Path], decoder: str, device: torch.device, workers: int) -> str:
    """Frames/s decoding every frame of ``clips`` with ``workers`` threads, and its CPU seconds."""
    read = make_frame_reader(decoder, device)

    def count(path: Path) -> int:
        n = 0
        for _ in read(path):
            n += 1
        return n

    cpu0, start = _cpu_seconds(), time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as ex:
        n = sum(ex.map(count, clips))
    sync(device)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    return f"{n} frames, {wall:.2f} s wall, {cpu:.2f} s CPU: {n / wall:.0f} frames/s"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def looped_clips(paths: Sequence[Path], loops: int, folder: Path) -> list[Path]:
    """The clips ``loops`` times, as links with distinct names (distinct video ids)."""
    if loops <= 1:
        return list(paths)
    out = []
    for k in range(loops):
        for p in paths:
            link = folder / f"{p.stem}__{k}{p.suffix}"
            link.symlink_to(p.resolve())
            out.append(link)
    return out


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
    p.add_argument("--loops", type=int, default=1, help="repeat the clip list N times")
    p.add_argument("--naive-frames", type=int, default=24, help="frames for the naive loop (0: no)")
    p.add_argument("--streams", default="appearance,motion")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--decoder", default="auto", choices=DECODERS)
    p.add_argument("--flow", default="dis", choices=("dis", "raft"))
    p.add_argument("--raft-weights", type=Path, help="RAFT weights (default: random, same speed)")
    p.add_argument("--raft-model", default="large", choices=("small", "large"))
    p.add_argument("--flow-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--raft-iters", type=int, default=12, help="RAFT flow updates")
    p.add_argument("--model-batches", type=int, default=4, help="batches timed for (c)")
    p.add_argument("--repeats", type=int, default=2, help="best of N, interleaved")
    p.add_argument("--compare-workers", action="store_true", help="threads vs processes")
    p.add_argument(
        "--engine", default="local", choices=("local", "ray"), help="ray: ray vs local (above)"
    )
    p.add_argument("--worker-counts", default="1,2,4", help="--engine ray: the workers table")
    args = p.parse_args()
    if args.engine == "ray":
        from ray_compare import compare_engines

        compare_engines(args, pick_clips(args.videos, args.frames), cpu_name())
        return
    streams = [s for s in args.streams.split(",") if s]
    device = torch.device(args.device)
    tmp_root = tempfile.TemporaryDirectory()
    tmp = Path(tmp_root.name)

    clips = pick_clips(args.videos, args.frames)
    paths = looped_clips([c for c, _ in clips], args.loops, tmp)
    n_frames = sum(n for _, n in clips) * max(1, args.loops)
    flow_kw: dict[str, object] = {"flow": args.flow}
    if args.flow == "raft" and "motion" in streams:
        weights = args.raft_weights
        if weights is None:
            from torchvision.models.optical_flow import raft_large, raft_small

            torch.manual_seed(0)
            build = raft_small if args.raft_model == "small" else raft_large
            weights = tmp / f"raft_{args.raft_model}.pth"
            torch.save(build(weights=None).state_dict(), weights)
        flow_kw.update(
            flow_weights=weights,
            flow_params={"dtype": args.flow_dtype, "num_flow_updates": args.raft_iters},
        )
    load_before = os.getloadavg()
    kinds = [*streams, "both"] if len(streams) > 1 else streams
    extractors = {
        k: FeatureExtractor(
            BackboneSpec(
                streams=tuple(streams) if k == "both" else (k,),
                weights="random",
                arch=args.arch,
                dtype=args.dtype,
                **(flow_kw if k != "appearance" else {}),  # type: ignore[arg-type]
            ),
            device=device,
            batch_size=args.batch_size,
        )
        for k in kinds
    }
    naive = args.naive_frames > 0 and device.type == "cpu"
    naive_models = {k: build_backbone(k, "random", args.arch) for k in streams} if naive else {}
    nan = float("nan")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}  # one entry per repeat
    for _ in range(args.repeats):  # interleaved, so that a burst of other work hits all columns
        for k in kinds:
            fx = extractors[k]
            c = model_alone(fx, fx.streams, args.model_batches)
            with tempfile.TemporaryDirectory() as store_dir:
                sampler = GpuSampler(device) if device.type == "cuda" else None
                if sampler is not None:
                    sampler.start()
                cpu0, start = _cpu_seconds(), time.perf_counter()
                summary = run_extraction(
                    make_sources(paths),
                    Path(store_dir) / "s",
                    fx,
                    workers=args.workers,
                    progress=False,
                    decoder=args.decoder,
                )
                wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
                a = summary.frames / wall
                gpu = sampler.stop() if sampler is not None else "n/a"
                assert summary.ok and summary.frames == n_frames, summary.format()
            b = nan
            if naive and k != "both":
                run = naive_appearance if k == "appearance" else naive_motion
                b = timed(partial(run, naive_models[k], paths, args.naive_frames))
            runs[k].append({"a": a, "b": b, "c": c, "wall": wall, "cpu": cpu, "gpu": gpu})
    rows = []
    for k in kinds:  # the fastest pipeline run (with its seconds and utilisation), best (b), (c)
        fastest = max(runs[k], key=lambda r: r["a"])
        b = max((r["b"] for r in runs[k]), default=nan) if naive and k != "both" else nan
        c = max(r["c"] for r in runs[k])
        rows.append((k, extractors[k].dtype, fastest, b, c))
    load_after = os.getloadavg()
    decoder_name, decode_device = resolve_decoder(args.decoder, device)
    rate = decode_rate(paths, args.decoder, device, args.workers)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"Machine: {dev_name} ({device}); CPU {cpu_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (a shared machine: other work "
        "slows every column)"
    )
    flow_desc = args.flow
    if args.flow == "raft":
        origin = "file" if args.raft_weights else "random"
        flow_desc = f"raft_{args.raft_model} ({origin} weights, {args.flow_dtype})"
    print(
        f"Best of {args.repeats} interleaved repeats. "
        f"Clips: {len(paths)} real clips ({len(clips)} distinct), {n_frames} frames for (a); "
        f"{args.naive_frames if naive else 0} frames for (b); {args.model_batches} batches of "
        f"{args.batch_size} for (c); arch {args.arch}, flow {flow_desc}, {args.workers} worker "
        f"threads, decoder {decoder_name} on {decode_device}\n"
    )
    print("| stream | dtype | (a) pipeline fps | (a) wall s | (a) CPU s | GPU util during (a) "
          "| (b) naive loop fps | (c) model alone fps | (a)/(b) | (a)/(c) |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stream, dtype, r, b, c in rows:
        a = r["a"]
        ab = f"{a / b:.2f}x" if b == b else "-"
        bs = f"{b:.1f}" if b == b else "-"
        print(
            f"| {stream} | {dtype} | {a:.1f} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['gpu']} | "
            f"{bs} | {c:.1f} | {ab} | {a / c:.0%} |"
        )
    print(
        f"\nDecode rate alone ({decoder_name} on {decode_device}, {args.workers} threads): {rate}"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"Peak RSS {peak:.0f} MiB" + (
        f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        if device.type == "cuda" else ""
    ))  # fmt: skip
    if args.compare_workers:
        res = compare_workers([c for c, _ in clips], args.workers)
        print(f"\nPreparation only (decode, resize, DIS flow, stacks), {args.workers} workers:\n")
        print("| workers | frames/s |\n| --- | ---: |")
        for kind, fps in res.items():
            print(f"| {kind} | {fps:.1f} |")
    tmp_root.cleanup()


if __name__ == "__main__":
    main()
