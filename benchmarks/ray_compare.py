"""``benchmarks/extract.py --engine ray``: the Ray Data engine against the local engine, on the
same machine and clips, in one run.

1. Throughput: ``run_extract(..., engine="local")`` (``--workers`` decode threads) and
   ``engine="ray"`` (a Ray instance of ``--workers`` + 1 logical CPUs started on this machine before
   the timing: ``--workers`` preparing tasks and one model actor), each end to end (model loading,
   Ray Data's start, worker processes), interleaved ``--repeats`` times; the best of each and
   their ratio.
2. Workers: the same on a flow-bound setting (motion only, DIS flow) for each of
   ``--worker-counts``.
3. Memory: the driver's peak RSS, and the peak RSS (VmHWM, sampled from /proc) of each kind of
   Ray worker process of the run: preparing tasks, model actors, writing tasks.

CPU seconds are this process's (for Ray: the driver's alone). An idle Ray worker ("other worker")
keeps the peak of the tasks it ran before.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (the packages on sys.path)

from extractor.pipeline import run_extract
from extractor.ray_engine import RayOptions
from extractor.spec import BackboneSpec

BATCH = [32]  # frames per model batch (set from --batch-size)
KINDS = {"prepare": "prepare_videos", "model actor": "EmbedVideos", "write": "write_videos"}


class WorkerMemory(threading.Thread):
    """Samples the peak RSS (VmHWM) of this machine's Ray worker processes started for this
    benchmark (their environment holds ``token``), by kind."""

    def __init__(self, token: str, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.token = f"FRAMEPOOL_BENCH={token}".encode()
        self.period = period
        self.peak: dict[str, float] = {}
        self.driver = 0.0  # this process's largest RSS while a Ray run was under way
        self.active = threading.Event()  # set while a Ray run is under way
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.sample()

    def sample(self) -> None:
        if self.active.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.driver = max(self.driver, int(line.split()[1]) / 1024)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if self.token not in (entry / "environ").read_bytes():
                    continue
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
                status = (entry / "status").read_text()
            except OSError:
                continue
            kind = next((k for k, name in KINDS.items() if name in title), "other worker")
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    mib = int(line.split()[1]) / 1024
                    self.peak[kind] = max(self.peak.get(kind, 0.0), mib)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        return self.peak


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _run(
    engine: str, paths: list[Path], spec: BackboneSpec, workers: int, token: str, device: str
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cpu0 = _cpu(resource.RUSAGE_SELF)
        start = time.perf_counter()
        summary = run_extract(
            paths,
            Path(tmp) / "s.zarr",
            spec,
            device=device,
            batch_size=BATCH[0],
            workers=workers,
            progress=False,
            engine=engine,
            ray=RayOptions(
                prepare_tasks=workers,
                runtime_env={"env_vars": {"FRAMEPOOL_BENCH": token}},
            )
            if engine == "ray"
            else None,
        )
        wall = time.perf_counter() - start
        assert summary.ok, summary.format()
        return {
            "frames": summary.frames,
            "wall": wall,
            "fps": summary.frames / wall,
            "driver_cpu": _cpu(resource.RUSAGE_SELF) - cpu0,
        }


def _compare(
    paths: list[Path], spec: BackboneSpec, workers: int, repeats: int, device: str
) -> dict[str, Any]:
    """Local and Ray, interleaved; the best run of each, the Ray workers' memory and CPU."""
    import ray

    token = f"{os.getpid()}-{time.time_ns()}"
    ray.init(
        address="local",  # this benchmark's own instance, not another one on this machine
        num_cpus=workers + 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        object_store_memory=1 << 30,
    )
    memory = WorkerMemory(token)
    memory.start()
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    try:
        for _ in range(repeats):
            for engine in ("local", "ray"):
                if engine == "ray":
                    memory.active.set()
                runs[engine].append(_run(engine, paths, spec, workers, token, device))
                memory.active.clear()
    finally:
        peaks = memory.stop()
        ray.shutdown()
    time.sleep(1.0)
    best = {k: max(v, key=lambda r: r["fps"]) for k, v in runs.items()}
    return {
        "workers": workers,
        "local": best["local"],
        "ray": best["ray"],
        "ratio": best["ray"]["fps"] / best["local"]["fps"],
        "worker_peak_rss_mib": peaks,
        "driver_rss_during_ray_mib": memory.driver,
        "all_runs": runs,
    }


def compare_engines(args: argparse.Namespace, clips: list[tuple[Path, int]], cpu: str) -> None:
    from _model_alone import model_alone

    from extractor.features import FeatureExtractor

    BATCH[0] = args.batch_size
    paths = [c for c, _ in clips]
    frames = sum(n for _, n in clips)
    load0 = os.getloadavg()[0]
    streams = tuple(s for s in args.streams.split(",") if s)
    main_spec = BackboneSpec(streams=streams, weights="random", arch=args.arch, dtype=args.dtype)
    motion = BackboneSpec(streams=("motion",), weights="random", arch=args.arch, dtype=args.dtype)
    fx = FeatureExtractor(main_spec, device=args.device, batch_size=args.batch_size)
    alone = model_alone(fx, fx.streams, args.model_batches)
    del fx
    main = _compare(paths, main_spec, args.workers, args.repeats, args.device)
    table = [
        _compare(paths, motion, int(w), args.repeats, args.device)
        for w in args.worker_counts.split(",")
        if int(w) > 0
    ]
    load1 = os.getloadavg()[0]
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"Machine: {cpu}, {os.cpu_count()} cores, shared with other work (load average "
        f"{load0:.1f} before, {load1:.1f} after); "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        f"Clips: {len(paths)} real clips, {frames} frames; arch {args.arch} (random weights), "
        f"DIS flow, batch {args.batch_size}, {args.device}; best of {args.repeats} interleaved "
        "runs, each end to end.\n"
    )
    print("| setting | engine | frames/s | wall s | driver CPU s | ray / local |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    rows = [(" + ".join(streams), main)] + [
        (f"motion only, {r['workers']} workers", r) for r in table
    ]
    for name, r in rows:
        for engine in ("local", "ray"):
            e = r[engine]
            ratio = f"{r['ratio']:.2f}" if engine == "ray" else ""
            print(
                f"| {name} | {engine} | {e['fps']:.1f} | {e['wall']:.1f} | "
                f"{e['driver_cpu']:.1f} | {ratio} |"
            )
    print(
        f"\nThe model alone ({' + '.join(streams)}, random input, batch {args.batch_size}, "
        f"{args.device}): {alone:.1f} frames/s; the Ray engine end to end reaches "
        f"{main['ray']['fps'] / alone:.0%} of it"
    )
    print(f"\nPeak RSS of this process (the local runs and the Ray driver): {driver_peak:.0f} MiB")
    for name, r in rows:
        peaks = ", ".join(f"{k} {v:.0f} MiB" for k, v in sorted(r["worker_peak_rss_mib"].items()))
        print(
            f"- {name}: Ray driver {r['driver_rss_during_ray_mib']:.0f} MiB during its run; "
            f"Ray workers' peak (VmHWM): {peaks}"
        )
    out = Path(__file__).resolve().parent / "results" / "ray_engine.json"
    out.parent.mkdir(exist_ok=True)
    record = {
        "machine": cpu,
        "cores": os.cpu_count(),
        "load_before": load0,
        "load_after": load1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clips": [str(p.name) for p in paths],
        "frames": frames,
        "arch": args.arch,
        "device": args.device,
        "model_alone_fps": alone,
        "repeats": args.repeats,
        "driver_peak_rss_mib": driver_peak,
        "rows": [{"setting": n, **r} for n, r in rows],
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nRaw results: {out}")
