"""Optical-flow rate: DIS on N CPU processes (the fallback) and RAFT batched on a device.

Pairs of consecutive grayscale frames of the real clips, resized to ``--size`` (default 240x320).

- DIS (preset fast): the pairs split over each of ``--processes`` worker process counts (each
  process single threaded); pairs/s and pairs per CPU-second (the rate per core).
- RAFT small and large, float32 and bfloat16 autocast, in batches of ``--batch`` pairs on
  ``--device``: pairs/s (the model alone, inputs already decoded), and the mean end-point error of
  bfloat16 against float32 on the same pairs. Weights: ``--raft-small``/``--raft-large`` files
  (torchvision state dicts); without them random weights (a speed figure; their end-point error
  says nothing about accuracy and the table says so).

    python benchmarks/flow.py --processes 1,2 --raft-pairs 2 --batch 2 --raft-size 128x128 \
        --iters 2 --models small                                    # CPU: proves the code path
    python benchmarks/flow.py --device cuda --processes 1,4,8,16 --raft-pairs 512 --batch 32

prints markdown tables with wall s, CPU s and peak RSS.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from _common import cpu_seconds, parser, peak_rss_mib, real_clips, table_head, table_row

from extractor.decode import iter_frames
from extractor.flow import DisFlow, RaftFlow
from extractor.transforms import to_gray


def load_pairs(folder: Path, n_pairs: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` consecutive grayscale pairs ``[n, h, w]`` uint8 from the clips, in turn."""
    h, w = size
    prev, nxt = [], []
    clips = real_clips(folder)
    per_clip = max(1, -(-n_pairs // len(clips)))
    for clip in clips:
        grays = [
            cv2.resize(to_gray(f), (w, h), interpolation=cv2.INTER_AREA)
            for _, f in zip(range(per_clip + 1), iter_frames(clip), strict=False)
        ]
        for a, b in itertools.pairwise(grays):
            prev.append(a)
            nxt.append(b)
    return np.stack(prev[:n_pairs]), np.stack(nxt[:n_pairs])


def _dis_chunk(prev: np.ndarray, nxt: np.ndarray) -> tuple[int, float]:
    """Runs in a worker process: (pairs, CPU seconds of computing their flow)."""
    cv2.setNumThreads(1)
    flow = DisFlow("fast")
    cpu0 = cpu_seconds()
    for a, b in zip(prev, nxt, strict=True):
        flow(a, b)
    return len(prev), cpu_seconds() - cpu0


def bench_dis(prev: np.ndarray, nxt: np.ndarray, processes: int) -> dict[str, float]:
    parts = np.array_split(np.arange(len(prev)), processes)
    # spawn: a fork of a process that holds torch's and OpenCV's thread pools can deadlock
    with cf.ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_dis_chunk, [prev[:2]] * processes, [nxt[:2]] * processes))  # start them
        t0 = time.perf_counter()
        done = list(ex.map(_dis_chunk, [prev[i] for i in parts], [nxt[i] for i in parts]))
        wall = time.perf_counter() - t0
    return {"pairs": sum(n for n, _ in done), "wall": wall, "cpu": sum(c for _, c in done)}


def _random_weights(arch: str, folder: Path) -> Path:
    from torchvision.models.optical_flow import raft_large, raft_small

    torch.manual_seed(0)
    model = raft_small(weights=None) if arch == "small" else raft_large(weights=None)
    path = folder / f"raft_{arch}_random.pth"
    torch.save(model.state_dict(), path)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_raft(
    weights: Path, device: torch.device, prev: np.ndarray, nxt: np.ndarray, batch: int, iters: int
) -> tuple[dict[str, dict[str, float]], float]:
    """Per dtype: pairs, wall s, CPU s; and the mean end-point error of bf16 against fp32."""
    out: dict[str, dict[str, float]] = {}
    flows: dict[str, list[torch.Tensor]] = {}
    for dtype in ("float32", "bfloat16"):
        raft = RaftFlow(weights, device=device, dtype=dtype, num_flow_updates=iters)
        raft.flow_batch(prev[:batch], nxt[:batch])  # warm-up (cuDNN choices, allocator)
        _sync(device)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        got = []
        for i in range(0, len(prev), batch):
            got.append(raft.flow_batch(prev[i : i + batch], nxt[i : i + batch]))
        _sync(device)
        out[dtype] = {
            "pairs": len(prev),
            "wall": time.perf_counter() - t0,
            "cpu": cpu_seconds() - cpu0,
        }
        flows[dtype] = got
    pairs = zip(flows["bfloat16"], flows["float32"], strict=True)
    epe = torch.cat([(a - b).norm(dim=-1).flatten() for a, b in pairs])
    return out, float(epe.mean())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", default="240x320", help="HxW of the flow input")
    p.add_argument("--pairs", type=int, default=240, help="frame pairs for DIS")
    p.add_argument("--processes", default="1,2", help="DIS worker process counts, e.g. 1,4,16")
    p.add_argument("--device", default="cpu", help="RAFT device: cpu or cuda")
    p.add_argument("--raft-pairs", type=int, default=None, help="pairs for RAFT (default --pairs)")
    p.add_argument("--batch", type=int, default=16, help="RAFT pairs per batch")
    p.add_argument("--raft-size", default=None, help="HxW for RAFT (default --size)")
    p.add_argument("--iters", type=int, default=12, help="RAFT flow updates")
    p.add_argument("--raft-small", type=Path, help="raft_small weights (default: random)")
    p.add_argument("--raft-large", type=Path, help="raft_large weights (default: random)")
    p.add_argument("--models", default="small,large", help="RAFT models to time")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    prev, nxt = load_pairs(args.videos, args.pairs, (h, w))
    print(
        f"{len(prev)} consecutive frame pairs of the real clips at {h}x{w}; {os.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.1f}\n"
    )
    print("DIS (preset fast), the pairs split over N single-threaded processes:\n")
    columns = ["processes", "pairs", "wall s", "CPU s", "pairs/s", "pairs per CPU-s"]
    print(table_head(columns, text_columns=0))
    for n in (int(v) for v in args.processes.split(",") if v):
        r = bench_dis(prev, nxt, n)
        rates = f"{r['pairs'] / r['wall']:.0f}", f"{r['pairs'] / r['cpu']:.0f}"
        print(table_row(n, int(r["pairs"]), f"{r['wall']:.2f}", f"{r['cpu']:.2f}", *rates))

    device = torch.device(args.device)
    rh, rw = (int(v) for v in (args.raft_size or args.size).lower().split("x"))
    n_raft = args.raft_pairs or args.pairs
    rp, rn = load_pairs(args.videos, n_raft, (rh, rw))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\nRAFT on {name} ({device}), {len(rp)} pairs at {rh}x{rw}, batches of {args.batch}, "
        f"{args.iters} flow updates; end-point error of bfloat16 against float32 on the same "
        "pairs:\n"
    )
    columns = ["model", "weights", "dtype", "pairs", "wall s", "CPU s", "pairs/s"]
    print(table_head([*columns, "EPE bf16 vs fp32 px"], text_columns=3))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [m for m in args.models.split(",") if m]:
            given = args.raft_small if arch == "small" else args.raft_large
            weights = given or _random_weights(arch, Path(tmp))
            label = "file" if given else "random"
            res, epe = bench_raft(weights, device, rp, rn, args.batch, args.iters)
            for dtype, r in res.items():
                e = f"{epe:.4f}" + ("" if given else " (random weights)")
                cost = f"{r['wall']:.2f}", f"{r['cpu']:.2f}", f"{r['pairs'] / r['wall']:.1f}"
                epe_cell = e if dtype == "bfloat16" else "-"
                print(table_row(f"raft_{arch}", label, dtype, int(r["pairs"]), *cost, epe_cell))
    print(f"\npeak RSS {peak_rss_mib(children=True):.0f} MiB")


if __name__ == "__main__":
    main()
