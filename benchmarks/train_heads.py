"""Seconds per training epoch of the pooling heads on cached features, beside matmul throughput.

Synthetic node tensors in memory (no store, no disk): UCF101 scale by default (13,320 videos,
101 classes, depth-6 pyramids, d = 2048, two streams). Each epoch runs the trainer's own loop
(:func:`aggregator.train_loop.fit_epoch`: shuffled index batches over in-memory tensors, Adam,
gradient clipping), so the numbers are what ``framepool train`` spends per epoch once the node
cache exists. The machine's fp32 (and bf16) matmul throughput is measured in the same run; each
head's FLOPs per epoch are counted analytically (matmul-like work, forward + backward) and
reported as a fraction of that peak.

Run at a smaller ``--videos`` to finish quickly: time per epoch is linear in the number of videos,
and the table extrapolates to ``--scale-to`` videos.

    python benchmarks/train_heads.py --videos 2000 --epochs 2

``--selection`` measures instead what the default selection grid costs: seconds per step of one
configuration and of the 3 x 3 grid trained together on the same batches
(:func:`aggregator.train_loop.train_trials`), and from the default budget
(:func:`aggregator.train_config.plan_budget` at ``--scale-to`` videos) the grid's cost and the
whole default run's (grid + refit) in units of one configuration.

    python benchmarks/train_heads.py --selection --videos 1000 --heads tp-concat,tp-average
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that sleep rather than spin at barriers. On a machine shared
# with other jobs, spinning OpenMP threads made 2-thread epochs up to 6x slower than 1 thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aggregator.data import NodeTensors, stratified_holdout
from aggregator.heads import TwoStream, build_model, pyramid_mix
from aggregator.train_config import TrainConfig, plan_budget
from aggregator.train_loop import (
    Trial,
    endless_batches,
    fit_epoch,
    make_optimizer,
    param_groups,
    train_trials,
    warmup_cosine,
)

STREAMS = ("appearance", "motion")


@dataclass
class Config:
    name: str
    head: str
    head_kwargs: dict[str, Any]
    leaves: bool
    flops: Callable[[int, int], float]  # (d, C) -> FLOPs per video per stream, fwd + bwd
    inputs: Callable[[int, np.ndarray], tuple[int, bool]]  # -> (M per video, needs mix)


def tp_concat_flops(depth: int, node_dim: int, leaves: bool) -> Callable[[int, int], float]:
    m, n_leaves = (1 << depth) - 1, 1 << (depth - 1)

    def f(d: int, c: int) -> float:
        rows = n_leaves if leaves else m
        proj = 2 * 2 * rows * d * node_dim  # forward + weight gradient (nodes need no gradient)
        mix = 2 * 2 * m * n_leaves * node_dim if leaves else 0  # bmm forward + its input gradient
        fc = 3 * 2 * m * node_dim * c  # forward, input and weight gradients
        return float(proj + mix + fc)

    return f


def tp_average_flops(depth: int, leaves: bool) -> Callable[[int, int], float]:
    m, n_leaves = (1 << depth) - 1, 1 << (depth - 1)

    def f(d: int, c: int) -> float:
        rows = n_leaves if leaves else m
        pool = 2 * 2 * rows * d  # weighted sum forward + gradient to the weights
        return float(pool + 3 * 2 * d * c)

    return f


def tpp_flops(bins: int) -> Callable[[int, int], float]:
    return lambda d, c: float(2 * 2 * bins * d * c)  # forward + weight gradient


def datp_flops(segments: int, gaussians: int) -> Callable[[int, int], float]:
    def f(d: int, c: int) -> float:
        n = segments
        convs = n * (d * 64 + 64 * 32 * 3 + 32 * 32 * 3)  # width-1 map, two temporal convs
        aux = 3 * 2 * (convs + 32 * n * 64 + 64 * 3 * gaussians)  # forward + both gradients
        pool = 3 * 2 * n * d  # weighted sum of the segments, forward + both gradients
        scores = 3 * 2 * d * c  # classifier on the pooled features
        return float(aux + pool + scores)

    return f


def attn_flops(segments: int, queries: int, dim: int, heads: int) -> Callable[[int, int], float]:
    def f(d: int, c: int) -> float:
        n, q, e, h = segments, queries, dim, heads
        attend = 2 * 2 * h * q * n * d  # scores and attended tokens, in the input space
        values = 2 * q * d * e  # value projection of the attended tokens
        block = 2 * q * e * e + 2 * 2 * q * e * 2 * e  # output projection, MLP (ratio 2)
        scores = 2 * q * e * c  # classifier on the concatenated queries
        return float(3 * (attend + values + block + scores))  # forward + both gradients

    return f


def configs(depth: int, leaves: bool) -> dict[str, Config]:
    m = (1 << depth) - 1
    n_leaves = 1 << (depth - 1)
    tp_m = n_leaves if leaves else m
    return {
        "tp-concat": Config(
            f"tp concat D={depth}",
            "tp",
            {"depth": depth, "variant": "concat"},
            leaves,
            tp_concat_flops(depth, 128, leaves),
            lambda d, t: (tp_m, leaves),
        ),
        "tp-average": Config(
            f"tp average D={depth}",
            "tp",
            {"depth": depth, "variant": "average"},
            leaves,
            tp_average_flops(depth, leaves),
            lambda d, t: (tp_m, leaves),
        ),
        "tpp": Config(
            "tpp max {1,2,4}",
            "tpp",
            {"pooling": "max", "levels": (1, 2, 4)},  # DTPP's bins, as the label says
            False,
            tpp_flops(7),
            lambda d, t: (7, False),
        ),
        "datp": Config(
            "datp N=10 K=2",
            "datp",
            {},
            False,
            datp_flops(10, 2),
            lambda d, t: (10, False),
        ),
        "attn": Config(
            "attn N=32 Q=4 e=256 H=8",
            "attn",
            {},
            False,
            attn_flops(32, 4, 256, 8),
            lambda d, t: (32, False),
        ),
    }


@dataclass
class Throughput:
    wall: float  # GFLOP per second of wall time (best of the repeats)
    cpu: float  # GFLOP per CPU-second of this process (all its threads)


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int = 5) -> Throughput:
    """Throughput of a ``[2 size, size] @ [size, size]`` matmul: best wall time of ``repeats``,
    and per CPU-second of this process, which other jobs on a shared machine barely change."""
    a = torch.randn(2 * size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    best, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    flops = 2 * 2 * size**3 / 1e9
    return Throughput(flops / best, flops / max(cpu, 1e-9))


def synthetic(
    cfg: Config, n: int, d: int, c: int, depth: int, dtype: torch.dtype, seed: int
) -> NodeTensors:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(29, 500, size=n)  # UCF101 clips: 29 .. 1776 frames, mean ~186
    m, with_mix = cfg.inputs(d, lengths)
    nodes, mixes = {}, {}
    for s in STREAMS:
        nodes[s] = torch.rand(n, m, d, generator=gen, dtype=torch.float32).to(dtype)
        if with_mix:
            mixes[s] = torch.from_numpy(
                np.stack([pyramid_mix(int(t), depth) for t in lengths]).astype(np.float32)
            )
    labels = torch.randint(c, (n,), generator=gen)
    return NodeTensors([f"v{i}" for i in range(n)], nodes, labels, mixes)


def run_config(cfg: Config, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    # as the trainer: bf16 runs keep the node tensors at the cache's float16 and convert batches
    hold = torch.float16 if bf16 else torch.float32
    data = synthetic(cfg, args.videos, args.dim, args.classes, args.depth, hold, args.seed)
    model = build_model(
        cfg.head,
        in_features=dict.fromkeys(STREAMS, args.dim),
        num_classes=args.classes,
        head_kwargs=cfg.head_kwargs,
    )
    assert isinstance(model, TwoStream)
    opt = torch.optim.Adam(param_groups(model, 1e-3, 1e-4, 10.0), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    index = np.arange(args.videos)
    times, cpu_times = [], []
    for _ in range(args.warmup + args.epochs):
        batches = (
            (nodes, y)
            for nodes, y, _ in data.batches(
                index, args.batch_size, windows=True, generator=gen, dtype=dtype
            )
        )
        t0, c0 = time.perf_counter(), time.process_time()
        fit_epoch(model, batches, opt, grad_clip=40.0, bf16=bf16)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    # the fastest timed epoch: on a shared machine the others measure the neighbours' load
    sec = float(np.min(times[args.warmup :]))
    cpu = float(np.min(cpu_times[args.warmup :]))
    flops = cfg.flops(args.dim, args.classes) * len(STREAMS) * args.videos
    return {"seconds": sec, "cpu_seconds": cpu, "flops": flops}


def selection_fold_count(config: TrainConfig, n_train: int, n_classes: int) -> int:
    """Folds the default selection trains the grid on for ``n_train`` training videos spread
    evenly over ``n_classes`` (:func:`aggregator.selection.selection_folds`: more folds while the
    validation part holds fewer than ``min_validation`` videos)."""
    labels = np.arange(n_train) % n_classes
    n_val = len(stratified_holdout(labels, config.val_fraction, 0)[1])
    folds = 1
    while folds < config.max_folds and n_val * folds < config.min_validation:
        folds += 1
    return folds


def selection_cost(cfg: Config, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step of one configuration and of the default grid trained together, and the
    default budget's costs in units of one configuration."""
    config = TrainConfig()
    n_all = args.scale_to
    n_fit = n_all - round(config.val_fraction * n_all)
    grid = config.grid()
    budget = plan_budget(config, n_fit, n_all, len(grid))
    folds = selection_fold_count(config, n_all, args.classes)
    data = synthetic(cfg, args.videos, args.dim, args.classes, args.depth, torch.float32, args.seed)
    index = np.arange(args.videos)

    def trials(k: int) -> list[Trial]:
        out = []
        for values in grid[:k]:
            torch.manual_seed(args.seed)
            model = build_model(
                cfg.head,
                in_features=dict.fromkeys(STREAMS, args.dim),
                num_classes=args.classes,
                head_kwargs=cfg.head_kwargs,
                standardize=True,
            )
            opt = make_optimizer(
                model, optimizer="adam", lr=values["lr"], weight_decay=values["weight_decay"]
            )
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(budget.steps, 0.05))
            out.append(Trial(values=values, model=model, opt=opt, sched=sched))
        return out

    gen = torch.Generator().manual_seed(args.seed)

    def epoch() -> Any:
        for x, y, _ in data.batches(index, budget.batch_size, windows=True, generator=gen):
            yield x, y

    per_step = {}
    for k in (1, len(grid)):
        batches = endless_batches(epoch)
        run = trials(k)
        kw: dict[str, Any] = {"device": torch.device("cpu"), "grad_clip": 40.0, "bf16": False}
        train_trials(run, batches, steps=args.warmup_steps, **kw)  # untimed
        best = float("inf")
        for _ in range(args.epochs):
            c0 = time.process_time()
            train_trials(run, batches, steps=args.steps, **kw)
            best = min(best, (time.process_time() - c0) / args.steps)
        per_step[k] = best
    one = budget.steps * per_step[1]
    grid_cost = folds * budget.select_steps * per_step[len(grid)]
    return {
        "folds": folds,
        "one_step": per_step[1],
        "grid_step": per_step[len(grid)],
        "configs": len(grid),
        "select_steps": budget.select_steps,
        "steps": budget.steps,
        "batch": budget.batch_size,
        "grid_ratio": grid_cost / one,
        "run_ratio": (grid_cost + one) / one,
    }


def main_selection(args: argparse.Namespace) -> None:
    rows = []
    for name in [h.strip() for h in args.heads.split(",") if h.strip()]:
        cfg = configs(args.depth, not args.no_leaves)[name]
        r = selection_cost(cfg, args)
        rows.append(
            f"| {cfg.name} | {r['one_step'] * 1e3:.0f} | {r['grid_step'] * 1e3:.0f} "
            f"({r['grid_step'] / r['one_step']:.1f}x) | {r['configs']} x {r['select_steps']} "
            f"| {r['folds']} | {r['steps']} | {r['grid_ratio']:.2f} | {r['run_ratio']:.2f} |"
        )
        print(rows[-1].replace("|", " ").strip(), flush=True)
    print()
    print(
        f"CPU seconds per step (best of {args.epochs} x {args.steps} steps, process time of "
        f"{torch.get_num_threads()} torch threads), batch as the default budget gives at "
        f"{args.scale_to} videos; d={args.dim}, {args.classes} classes, two streams, fp32; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| head | CPU ms/step, one configuration | CPU ms/step, grid together | grid steps "
        "| folds | final steps | grid / one configuration | default run / one configuration |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=13320, help="videos per epoch (measured)")
    p.add_argument("--scale-to", type=int, default=13320, help="videos to extrapolate to")
    p.add_argument("--classes", type=int, default=101)
    p.add_argument("--depth", type=int, default=6, help="pyramid depth (63 nodes at 6)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (fastest reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument(
        "--heads",
        default="tp-concat,tp-average,tpp,datp",
        help="comma-separated: tp-concat, tp-average, tpp, datp, attn",
    )
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--no-leaves", action="store_true", help="tp on all nodes, not on leaves")
    p.add_argument("--both-tp-paths", action="store_true", help="tp on leaves and on all nodes")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--selection", action="store_true", help="measure the selection grid's cost")
    p.add_argument("--steps", type=int, default=10, help="--selection: timed steps per repeat")
    p.add_argument("--warmup-steps", type=int, default=3, help="--selection: untimed steps")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.selection:
        main_selection(args)
        return
    precisions = [s.strip() for s in args.precision.split(",") if s.strip()]
    threads = torch.get_num_threads()
    peak = {"fp32": matmul_gflops(torch.float32, args.matmul_size)}
    if "bf16" in precisions:
        peak["bf16"] = matmul_gflops(torch.bfloat16, args.matmul_size)

    rows = []
    leaf_modes = [True, False] if args.both_tp_paths else [not args.no_leaves]
    for name in [h.strip() for h in args.heads.split(",") if h.strip()]:
        for leaves in leaf_modes if name.startswith("tp-") else [False]:
            cfg = configs(args.depth, leaves)[name]
            for precision in precisions:
                r = run_config(cfg, args, precision)
                scale = args.scale_to / args.videos
                per_cpu = r["flops"] / r["cpu_seconds"] / 1e9
                free = r["cpu_seconds"] * scale / threads  # wall time with the cores to itself
                label = cfg.name + (" (leaves)" if cfg.leaves else "")
                rows.append(
                    f"| {label} | {precision} | {r['seconds'] * scale:.1f} | {free:.1f} | "
                    f"{r['flops'] * scale / 1e9:.0f} | {per_cpu:.1f} | "
                    f"{100 * per_cpu / peak['fp32'].cpu:.0f}% | {120 / free:.1f} |"
                )
                print(rows[-1].replace("|", " ").strip(), flush=True)

    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}, torch {torch.__version__}; "
        f"fp32 matmul {peak['fp32'].cpu:.1f} GFLOP per CPU-second ({peak['fp32'].wall:.1f} "
        "GFLOP/s wall)"
        + (
            f", bf16 {peak['bf16'].cpu:.1f} per CPU-second ({peak['bf16'].wall:.1f} wall)"
            if "bf16" in peak
            else ""
        )
        + f"; [{2 * args.matmul_size}x{args.matmul_size}] @ [{args.matmul_size}x"
        f"{args.matmul_size}], best of 5; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"synthetic node tensors: {args.videos} videos measured, {len(STREAMS)} streams, "
        f"d={args.dim}, {args.classes} classes, batch {args.batch_size}, Adam; fastest of "
        f"{args.epochs} timed epochs after {args.warmup} untimed; extrapolated linearly to "
        f"{args.scale_to} videos. Throughput per CPU-second (process time of all threads) is "
        "compared with the matmul's, as other jobs on a shared machine barely change it; "
        "'cores free' = CPU seconds / threads, the wall time with the cores to itself."
    )
    print()
    n = args.scale_to
    print(
        f"| head | precision | s/epoch at {n} (wall, measured) | s/epoch at {n} (cores free) | "
        f"GFLOP/epoch at {n} | GFLOP per CPU-s | of fp32 matmul | epochs in 2 min (cores free) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
