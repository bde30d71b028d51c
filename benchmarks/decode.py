"""Decoding rate: PyAV vs torchcodec on the CPU (and torchcodec with NVDEC on a CUDA device).

Every frame of the real clips to ``[H, W, 3]`` uint8 RGB (what the pipeline consumes), each
configuration in a fresh process (so that its peak RSS is its own), best of ``--repeats``
interleaved runs. Frames per CPU-second is the rate per core: what one decode worker gives, and
what N workers give on N cores. ``1 thread`` rows decode with one FFmpeg thread (the pipeline's
workers each decode one video); ``auto threads`` lets FFmpeg use several.

    python benchmarks/decode.py                    # CPU rows
    python benchmarks/decode.py --device cuda      # and NVDEC rows

prints a markdown table: decoder, threads, frames, wall s, CPU s, frames/s, frames per CPU-s,
peak RSS.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

from _common import cpu_seconds, parser, peak_rss_mib, real_clips, table_head, table_row

from extractor.decode import iter_frames
from extractor.decode_torchcodec import iter_frames_torchcodec, torchcodec_problem


def _decode_all(decoder: str, threads: str, device: str, clips: list[str]) -> dict[str, float]:
    """Runs in a fresh process: decode every clip, return frames, wall s, CPU s, peak RSS MiB."""
    import torch

    torch.set_num_threads(1)
    warm = clips[0]  # load the libraries outside the timing
    if decoder == "pyav":
        next(iter(iter_frames(warm)))
    else:
        next(iter(iter_frames_torchcodec(warm, device=device)))
    n = 0
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for clip in clips:
        if decoder == "pyav":
            for _ in iter_frames(clip, threads=threads == "auto"):
                n += 1
        else:
            tc_threads = 0 if threads == "auto" else 1
            for _ in iter_frames_torchcodec(clip, device=device, threads=tc_threads):
                n += 1
            if device != "cpu":
                torch.cuda.synchronize()
    wall = time.perf_counter() - wall0
    cpu = cpu_seconds() - cpu0
    return {"frames": n, "wall": wall, "cpu": cpu, "rss": peak_rss_mib()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--device", default="cpu", help="cpu, or cuda to add NVDEC rows")
    p.add_argument("--repeats", type=int, default=3, help="best of N, interleaved")
    p.add_argument("--threads", default="1,auto", help="FFmpeg threads: 1, auto or both")
    args = p.parse_args()
    clips = [str(c) for c in real_clips(args.videos)]
    problem = torchcodec_problem()
    configs = [("pyav", t, "cpu") for t in args.threads.split(",")]
    if problem is None:
        configs += [("torchcodec", t, "cpu") for t in args.threads.split(",")]
        if args.device.startswith("cuda"):
            configs.append(("torchcodec", "nvdec", args.device))
    ctx = mp.get_context("spawn")
    best: dict[tuple[str, str, str], dict[str, float]] = {}
    load_before = os.getloadavg()[0]
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for _ in range(args.repeats):
            for cfg in configs:
                r = pool.apply(_decode_all, (*cfg, clips))
                if cfg not in best or r["wall"] < best[cfg]["wall"]:
                    best[cfg] = r
    load_after = os.getloadavg()[0]
    print(
        f"{len(clips)} real clips from {args.videos}; {os.cpu_count()} cores, load average "
        f"{load_before:.1f} before, {load_after:.1f} after; best of {args.repeats} "
        "interleaved runs, each in a fresh process\n"
    )
    if problem is not None:
        print(f"torchcodec rows left out: {problem}\n")
    columns = ["decoder", "threads", "device", "frames", "wall s", "CPU s", "frames/s"]
    print(table_head([*columns, "frames per CPU-s", "peak RSS MiB"], text_columns=3))
    for (decoder, threads, device), r in best.items():
        rates = f"{r['frames'] / r['wall']:.0f}", f"{r['frames'] / r['cpu']:.0f}"
        cost = f"{r['wall']:.2f}", f"{r['cpu']:.2f}"
        print(
            table_row(decoder, threads, device, int(r["frames"]), *cost, *rates, f"{r['rss']:.0f}")
        )


if __name__ == "__main__":
    main()
