"""Seconds per fine-tuning epoch for several periods K, and the speed-up over K = 1.

At epoch r only the frames t ≡ r (mod K) go through the backbone with gradient (forward +
backward, about 3 forward passes each); the other frames need a forward pass without gradient
(``compute`` mode), are read from a feature store extracted with the same backbone (``store``
mode), or reuse the features they had at the video's previous step (``memory`` mode,
``--reuse-features``; its first epoch computes every frame and is left out of the mean).
Decoding and flow are done once before the timed epochs (inputs cached in memory).

    python benchmarks/finetune.py --arch resnet18 --max-frames 24 --videos 4 --periods 1,4,8

prints a markdown table: mode, K, frames with gradient per epoch, seconds per epoch (mean over
``--epochs``), and the K = 1 / K ratio within each mode; also per CPU time of the process, which
is steadier than wall time on a shared machine (on a GPU, wall time is the one that counts).

``--memory`` measures instead the peak memory of one epoch against the frames per video T, with
the backward pass over one graph (``grad_frames`` none) and in chunks of ``--grad-frames``
frames: each setting runs in a fresh process (so that its peak RSS is its own), K = 1 (every
frame carries gradient, the worst case), and the table gives wall and CPU seconds, peak RSS and,
on a GPU, peak GPU memory:

    python benchmarks/finetune.py --memory --arch resnet18 --videos 2 --lengths 12,48,120

``--memory --command`` runs ``framepool finetune`` itself, with default options (the frames with
gradient per backward chunk chosen from the memory budget), on four short real clips of
``tests/data/videos`` (32, 57, 72 and 164 frames, two classes), and reports its peak RSS (from
``wait4``), wall and CPU seconds and the chunk size it chose; a watchdog stops it when its RSS
passes ``--rss-limit``:

    nice python benchmarks/finetune.py --memory --command --arch resnet101 --stream both
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aggregator.finetune.job import run_finetune_job, start_extractor  # noqa: E402
from aggregator.finetune.loop import FinetuneSettings  # noqa: E402
from extractor.spec import BackboneSpec  # noqa: E402
from storage import FeatureStore, assign_video_ids  # noqa: E402

CLIPS = REPO.parent / "shared" / "data" / "videos"
DEFAULT_CLIPS = (
    "mm_part_0.mp4",
    "mm_demo_spatiotemporal_det.mp4",
    "mm_test.avi",
    "tu_v_Basketball_g01_c01.avi",
    "mm_demo.mp4",
    "tu_abseiling_k400.mp4",
    "mm_test.mp4",
    "vf_v_GGSY1Qvo990.mp4",
)


def make_store(
    path: Path,
    videos: dict[str, Path],
    spec: BackboneSpec,
    device: torch.device,
    amp: bool,
    max_frames: int | None,
) -> None:
    """Extract the starting backbones' features of ``videos`` into a new store."""
    fx = start_extractor(spec, device, amp)
    store = FeatureStore.create(path, extractor=fx.config())
    for vid, p in videos.items():
        ex = fx.extract_file(p, max_frames=max_frames)
        store.write_video(
            vid,
            ex.features,
            label=vid,
            meta={"n_frames": ex.n_frames, "frame_indices": ex.frame_indices.tolist()},
        )


def memory_child(args: argparse.Namespace, length: int, grad_frames: int | None) -> int:
    """One fine-tuning epoch in this process; prints its seconds and peak memory as JSON."""
    paths = [Path(p) for p in args.clips] if args.clips else [CLIPS / n for n in DEFAULT_CLIPS]
    paths = sorted(paths, key=lambda p: -p.stat().st_size)[: args.videos]
    ids = assign_video_ids(paths)
    videos = {ids[str(p)]: p for p in paths}
    labels = {v: f"c{i % 2}" for i, v in enumerate(sorted(videos))}
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else
        ("cpu" if args.device == "auto" else args.device)
    )  # fmt: skip
    streams = ("appearance", "motion") if args.stream == "both" else (args.stream,)
    settings = FinetuneSettings(
        period=1,
        epochs=1,
        batch_videos=len(videos),
        chunk_size=args.chunk_size,
        grad_frames=grad_frames,
        amp=device.type == "cuda",
    )
    with tempfile.TemporaryDirectory() as tmp:
        history = run_finetune_job(
            videos,
            labels,
            Path(tmp) / "run",
            backbone=BackboneSpec(streams=streams, arch=args.arch, weights="random"),
            settings=settings,
            head="tp",
            head_kwargs={"depth": 4},
            device=device,
            cache_dir="memory",
            max_frames=length,
        )
    h = history[0]
    out = {
        "T": h["frames_total"] / len(videos),
        "frames_with_grad": h["frames_with_grad"],
        "seconds": h["seconds"],
        "cpu_seconds": h["cpu_seconds"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else None,
    }
    print(json.dumps(out))
    return 0


def memory_table(args: argparse.Namespace) -> int:
    """Peak memory of one epoch against T, one fresh process per setting."""
    lengths = [int(t) for t in args.lengths.split(",")]
    rows = []
    for length in lengths:
        for grad_frames in (None, args.grad_frames):
            cmd = [sys.executable, __file__, "--memory-child", str(length), str(grad_frames or 0)]
            cmd += ["--arch", args.arch, "--stream", args.stream, "--videos", str(args.videos)]
            cmd += ["--chunk-size", str(args.chunk_size), "--device", args.device]
            cmd += [*(["--clips", *args.clips] if args.clips else [])]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((length, grad_frames, row))
            print(f"T={length} grad_frames={grad_frames}: {row}", file=sys.stderr)
    print(
        f"\nfine-tuning memory, one epoch, K = 1, {args.arch}, stream {args.stream}, "
        f"{args.videos} clips in one batch, chunk size {args.chunk_size}\n"
    )
    print("| T (frames / video) | grad frames per backward | frames with grad | s | CPU s "
          "| peak RSS MiB | peak GPU MiB |")  # fmt: skip
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for _length, grad_frames, r in rows:
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(
            f"| {r['T']:.0f} | {grad_frames or 'all (one graph)'} | {r['frames_with_grad']} "
            f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mib']:.0f} | {gpu} |"
        )
    return 0


COMMAND_CLIPS = {  # four short real clips: 32, 57, 72 and 164 frames
    "mm_part_0.mp4": "a",
    "mm_demo_spatiotemporal_det.mp4": "b",
    "mm_demo_skeleton.mp4": "a",
    "mm_test.avi": "b",
}


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def command_memory(args: argparse.Namespace) -> int:
    """Peak RSS of ``framepool finetune --streams both --period 4 --epochs 2 --weights random``
    with default options, in a child process watched against ``--rss-limit``."""
    from aggregator.node_cache import parse_bytes

    limit = parse_bytes(args.rss_limit)
    clips = REPO / "tests" / "data" / "videos"
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        labels.write_text(
            "path,label\n" + "".join(f"{clips / n},{lb}\n" for n, lb in COMMAND_CLIPS.items())
        )
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "api.cli", "finetune", "--videos"]
        cmd += [str(clips / n) for n in COMMAND_CLIPS]
        cmd += ["--labels", str(labels), "--out", str(out), "--streams", args.stream]
        cmd += ["--period", "4", "--epochs", "2", "--weights", "random", "--arch", args.arch]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        seen = {"max": 0, "killed": False}

        def watch() -> None:
            while proc.poll() is None:
                rss = _rss(proc.pid)
                seen["max"] = max(seen["max"], rss)
                if rss > limit:
                    seen["killed"] = True
                    proc.kill()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        watcher.join()
        wall = time.perf_counter() - t0
        config = out / "config.json"
        chunks = json.loads(config.read_text()).get("backward_chunks") if config.is_file() else None
    print(stdout, file=sys.stderr)
    if seen["killed"]:
        print(f"stopped: RSS passed {args.rss_limit}", file=sys.stderr)
        return 1
    if proc.returncode != 0:
        print(f"framepool finetune failed ({proc.returncode})", file=sys.stderr)
        return 1
    row = {
        "command": " ".join(cmd[2:]),
        "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "backward_chunks": chunks,
    }
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"\nframepool finetune, default options, {args.arch}, stream {args.stream}\n")
    print("| grad frames per chunk (chosen) | memory budget | peak RSS | wall s | CPU s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    budget = (chunks or {}).get("memory_budget")
    print(
        f"| {(chunks or {}).get('grad_frames')} | "
        f"{'-' if budget is None else f'{budget / 2**30:.2f} GiB'} | "
        f"{row['peak_rss_gib']:.2f} GiB | {wall:.0f} | {row['cpu_s']:.0f} |"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", nargs="*", help="video files (default: real clips in shared/)")
    ap.add_argument("--videos", type=int, default=4, help="how many clips")
    ap.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50", "resnet101"))
    ap.add_argument("--stream", default="appearance", choices=("appearance", "motion", "both"))
    ap.add_argument("--max-frames", type=int, default=24, help="frames kept per clip")
    ap.add_argument("--periods", default="1,4,8", help="comma-separated K values (24 on a GPU)")
    ap.add_argument("--modes", default="compute,store,memory", help="any of compute, store, memory")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per setting")
    ap.add_argument("--batch-videos", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--memory", action="store_true", help="peak memory against T instead")
    ap.add_argument("--lengths", default="12,48,120", help="--memory: frames per video")
    ap.add_argument("--grad-frames", type=int, default=8, help="--memory: frames per backward")
    ap.add_argument(
        "--command", action="store_true", help="--memory: framepool finetune, default options"
    )
    ap.add_argument("--rss-limit", default="8G", help="--command: stop the run past this RSS")
    ap.add_argument("--json", help="--command: append the result to this JSON-lines file")
    ap.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        length, grad_frames = args.memory_child
        return memory_child(args, length, grad_frames or None)
    if args.memory and args.command:
        return command_memory(args)
    if args.memory:
        return memory_table(args)

    paths = [Path(p) for p in args.clips] if args.clips else [CLIPS / n for n in DEFAULT_CLIPS]
    paths = paths[: args.videos]
    ids = assign_video_ids(paths)
    videos = {ids[str(p)]: p for p in paths}
    labels = {v: f"c{i % 2}" for i, v in enumerate(sorted(videos))}
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    amp = device.type == "cuda"
    streams = ("appearance", "motion") if args.stream == "both" else (args.stream,)
    spec = BackboneSpec(streams=streams, arch=args.arch, weights="random")
    periods = [int(k) for k in args.periods.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]

    rows: list[tuple[str, int, float, int, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "store.zarr"
        if "store" in modes:
            t0 = time.perf_counter()
            make_store(store_path, videos, spec, device, amp, args.max_frames)
            print(f"store extracted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for mode in modes:
            for k in periods:
                settings = FinetuneSettings(
                    period=k,
                    epochs=args.epochs,
                    batch_videos=args.batch_videos,
                    chunk_size=args.chunk_size,
                    amp=amp,
                )
                history = run_finetune_job(
                    videos,
                    labels,
                    Path(tmp) / f"{mode}-{k}",
                    backbone=spec,
                    settings=settings,
                    head="tp",
                    head_kwargs={"depth": 4},
                    device=device,
                    store=store_path if mode == "store" else None,
                    cache_dir="memory",
                    max_frames=args.max_frames,
                    reuse_features=mode == "memory",
                )
                if mode == "memory":  # the first epoch computes every frame; time the others
                    history = history[1:] or history
                n = len(history)
                secs = sum(h["seconds"] for h in history) / n
                cpu = sum(h["cpu_seconds"] for h in history) / n
                grad = sum(h["frames_with_grad"] for h in history) / n
                total = int(history[0]["frames_total"])
                rows.append((mode, k, grad, total, secs, cpu))
                print(f"{mode} K={k}: {secs:.2f} s/epoch, {cpu:.2f} CPU s", file=sys.stderr)

    print(
        f"\nfine-tuning epoch time, {args.arch}, stream {args.stream}, {len(videos)} clips x "
        f"<= {args.max_frames} frames, device {device}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| mode | K | frames with grad / epoch | frames / epoch | s / epoch | K=1 / K "
        "| CPU s / epoch | K=1 / K (CPU) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, k, grad, total, secs, cpu in rows:
        base = next((r for r in rows if r[0] == mode and r[1] == 1), None)
        ratio = f"{base[4] / secs:.2f}" if base is not None else "-"
        ratio_cpu = f"{base[5] / cpu:.2f}" if base is not None else "-"
        print(
            f"| {mode} | {k} | {grad:.1f} | {total} | {secs:.2f} | {ratio} | {cpu:.2f} "
            f"| {ratio_cpu} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
