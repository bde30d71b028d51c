"""Load test of ``framepool serve``: concurrent clients uploading real clips for a fixed time.

Starts the service as a subprocess on a free local port, waits until /readyz answers, then runs
``--clients`` threads, each posting clips to /v1/predict in a loop until ``--duration`` seconds
have passed (a 503 is honoured: the client waits Retry-After, capped at 1 s). Prints a markdown
table: requests, status codes, throughput, latency percentiles of the answered requests, the
server's stage times, and the server's peak resident memory (VmHWM).

    python benchmarks/serve_load.py --run RUN_DIR --clips a.mp4 b.avi --clients 8 --duration 60 \
        --max-frames 16

``--sweep`` measures the batcher instead: one server per setting, with the batcher off
(``framepool serve --batch-max-frames 0``) and on (``--batch-max-frames``), each at 1, 4 and 8
clients (``--sweep-clients``), all with the same ``--workers``, interleaved and ``--repeats`` times
(median answers/s; latencies pooled); it prints answers/s, latency p50/p95 and
the server's CPU seconds per answer, the ratio of answers/s with and without the batcher, and
writes the figures as JSON (``--json``). Without ``--run`` it first builds a small run from the
shipped clips (random-weight ResNet-18, both streams, DIS flow, a ``gap`` head):

    python benchmarks/serve_load.py --sweep --clips tests/data/videos/*.mp4 --max-frames 8 \
        --workers 8 --duration 30 --json benchmarks/results/serve_load.json

``--explain`` says what bounds the batcher: the CPU seconds of one request's decoding and flow
(with the threads a worker gets) against its backbones alone and inside a 64-frame pass, on one
torch thread and on the batcher's threads (:mod:`api.service.threads`), and the sizes and waits
of the passes an in-process service forms under the largest ``--sweep-clients`` load for
``--duration`` s.

``--hostile N`` adds N misbehaving clients of each kind beside the normal ones, to show that
they are still served: ``slow`` (sends its upload at 4 KiB/s), ``stall`` (sends half of it, then
nothing), ``oversize`` (declares 1 GiB; and streams zeros without a length until cut off),
``flood`` (a 3,000-frame 16x16 video, about 200 KB that decode to far more frames than the
service's frame limit). The server then runs with short upload timeouts and a small upload disk
budget (``--hostile-env``); the table gives status codes and latency per kind of client.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np


@dataclass
class Record:
    clip: str
    status: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def tiny_frame_flood(path: Path, n_frames: int = 3000) -> Path:
    """A long video of tiny frames: small to upload, many frames to decode."""
    from extractor.synthetic import write_video

    rng = np.random.default_rng(0)
    write_video(path, rng.integers(0, 256, (n_frames, 16, 16, 3), dtype=np.uint8), fps=25)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process from /proc (KiB); 0 when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


HOSTILE_ENV = {  # Settings by environment: short upload timeouts, a small disk budget
    "FRAMEPOOL_UPLOAD_IDLE_TIMEOUT_S": "5",
    "FRAMEPOOL_UPLOAD_TIMEOUT_S": "20",
    "FRAMEPOOL_UPLOAD_BUDGET_MB": "16",
    "FRAMEPOOL_JOB_TIMEOUT_S": "60",
    "FRAMEPOOL_MAX_FRAMES_LIMIT": "32",
}


def start_server(
    args: argparse.Namespace,
    port: int,
    flags: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "api.cli", "serve", "--port", str(port), *(flags or [])]
    for run in args.run:
        cmd += ["--run", run]
    cmd += ["--workers", str(args.workers), "--queue-size", str(args.queue_size)]
    if args.torch_threads:
        cmd += ["--threads", str(args.torch_threads)]
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} while starting")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the server was not ready after {timeout:g} s")


def client(
    idx: int,
    base: str,
    clips: list[Path],
    params: dict[str, Any],
    deadline: float,
    out: list[Record],
    lock: threading.Lock,
) -> None:
    data = {p: p.read_bytes() for p in clips}
    i = idx
    with httpx.Client(timeout=600) as http:
        while time.monotonic() < deadline:
            clip = clips[i % len(clips)]
            i += 1
            t0 = time.perf_counter()
            try:
                r = http.post(
                    f"{base}/v1/predict",
                    params=params,
                    files={"file": (clip.name, data[clip], "application/octet-stream")},
                )
                status = r.status_code
                body = r.json() if status == 200 else {}
            except httpx.HTTPError:
                status, body = 0, {}
            rec = Record(clip.name, status, time.perf_counter() - t0, body.get("timings", {}))
            with lock:
                out.append(rec)
            if status == 503:
                wait = float(r.headers.get("retry-after", "1"))
                time.sleep(min(wait, 1.0, max(0.0, deadline - time.monotonic())))


BOUNDARY = "loadBoundary3f9c"


def _multipart(video: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="v"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + video
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def _head(port: int, length: int | None) -> bytes:
    size = (
        f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    )
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{size}"
        "Connection: close\r\n\r\n"
    ).encode()


def _status(sock: socket.socket) -> int:
    """The status of the answer on ``sock`` (0 when the connection ended without one)."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def hostile(
    kind: str, port: int, video: bytes, deadline: float, out: list[Record], lock: threading.Lock
) -> None:
    """One misbehaving client of ``kind`` (slow, stall, oversize), in a loop until ``deadline``."""
    body = _multipart(video)
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        status = 0
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                if kind == "slow":  # 4 KiB/s, until the server answers (408) or it is all sent
                    sock.sendall(_head(port, len(body)))
                    sock.settimeout(0.0)
                    for i in range(0, len(body), 4096):
                        try:
                            if sock.recv(1, socket.MSG_PEEK):
                                break  # an answer came before the end
                        except BlockingIOError:
                            pass
                        sock.sendall(body[i : i + 4096])
                        time.sleep(1.0)
                    sock.settimeout(120)
                elif kind == "stall":  # half, then nothing
                    sock.sendall(_head(port, len(body)) + body[: len(body) // 2])
                elif kind == "oversize-declared":
                    sock.sendall(_head(port, 2**30))
                elif kind == "oversize-streamed":  # zeros, chunked, no declared length
                    sock.sendall(_head(port, None))
                    start = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                    start += 'filename="z"\r\n\r\n'
                    sock.sendall(f"{len(start):x}\r\n{start}\r\n".encode())
                    zeros = b"\0" * 65536
                    for _ in range(8192):  # 512 MiB at most
                        sock.sendall(f"{len(zeros):x}\r\n".encode() + zeros + b"\r\n")
                status = _status(sock)
        except OSError:
            status = status or -1  # reset by the server after its answer, as for an oversize body
        with lock:
            out.append(Record(kind, status, time.perf_counter() - t0))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc; 0 when unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def build_run(root: Path, clips: list[Path]) -> Path:
    """A small run to serve: the clips extracted with a random-weight ResNet-18 (both streams,
    DIS flow, 8 frames each) under two made-up labels, and a ``gap`` head trained on them."""
    import csv

    from api.cli import main as cli_main

    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(
            (str(c.resolve()), f"class{i % 2}", "test" if i % 3 == 2 else "train")
            for i, c in enumerate(clips)
        )
    store, run = root / "store.zarr", root / "run-gap"
    extract = ["extract", *map(str, clips), "--store", str(store), "--labels", str(labels)]
    extract += ["--arch", "resnet18", "--weights", "random", "--flow", "dis", "--max-frames", "8"]
    if cli_main([*extract, "--device", "cpu", "--no-progress"]) != 0:
        raise RuntimeError("extracting the clips for the benchmark's run failed")
    train = ["train", "--store", str(store), "--head", "gap", "--out", str(run)]
    train += ["--epochs", "3", "--val-fraction", "0", "--device", "cpu", "--no-plots"]
    if cli_main(train) != 0:
        raise RuntimeError("training the benchmark's run failed")
    return run


def load_once(
    args: argparse.Namespace, clips: list[Path], params: dict[str, Any], clients: int, batch: int
) -> dict[str, Any]:
    """One server with the batcher set to ``batch`` frames (0: off), ``clients`` clients for
    ``args.duration`` seconds; the figures of the answered requests."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flags = ["--batch-max-frames", str(batch)]
    if args.batch_max_wait_s is not None:
        flags += ["--batch-max-wait", str(args.batch_max_wait_s)]
    proc = start_server(args, port, flags)
    records: list[Record] = []
    try:
        wait_ready(base, proc, args.ready_timeout)
        warm = threading.Lock()
        client(0, base, clips[:1], params, time.monotonic() + 0.1, [], warm)  # first-call costs
        lock = threading.Lock()
        cpu0, t0 = cpu_seconds_of(proc.pid), time.monotonic()
        deadline = t0 + args.duration
        threads = [
            threading.Thread(target=client, args=(i, base, clips, params, deadline, records, lock))
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        cpu = cpu_seconds_of(proc.pid) - cpu0
        peak = rss_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ok = [r for r in records if r.status == 200]
    lat = [r.seconds for r in ok]
    return {
        "clients": clients,
        "batch_max_frames": batch,
        "requests": len(records),
        "answered": len(ok),
        "status_codes": dict(collections.Counter(str(r.status) for r in records)),
        "wall_s": wall,
        "answers_per_s": len(ok) / wall,
        "p50_s": pct(lat, 50),
        "p95_s": pct(lat, 95),
        "latencies_s": [round(x, 3) for x in lat],
        "server_cpu_s": cpu,
        "server_cpu_s_per_answer": cpu / len(ok) if ok else float("nan"),
        "server_peak_rss_mib": peak / 1024,
        "mean_decode_extract_s": float(np.mean([r.timings.get("decode_extract", 0) for r in ok]))
        if ok
        else float("nan"),
    }


def explain(args: argparse.Namespace, clips: list[Path]) -> int:
    """What bounds the batcher: the CPU seconds of one request's decoding, flow and crops (not
    batched) against its backbones alone and inside a 64-frame pass; and the passes an
    in-process service with ``--workers`` forms under ``max(--sweep-clients)`` clients."""
    import resource

    from fastapi.testclient import TestClient

    from api.service import Settings, create_app
    from api.service.threads import plan_threads, use_opencv_threads, use_torch_threads
    from extractor.features import FeatureExtractor
    from extractor.prepare import FrameChunk, prepare_video
    from extractor.spec import BackboneSpec

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    fx = FeatureExtractor(BackboneSpec(arch="resnet18", weights="random", flow="dis"), device="cpu")
    plan = plan_threads(args.workers, batcher=True, torch_threads=args.torch_threads)
    use_opencv_threads(plan.opencv)
    use_torch_threads(plan.worker)
    prep = 0.0
    batches = []
    for clip in clips:
        t = cpu()
        assert fx.flow is not None
        items = prepare_video(clip, streams=fx.streams, flow=fx.flow.clone(), max_frames=8)
        chunks = [c for c in items if isinstance(c, FrameChunk)]
        prep += cpu() - t
        batches.append({s: np.concatenate([getattr(c, s) for c in chunks]) for s in fx.streams})
    n = len(clips)
    print(
        f"# load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs; threads: "
        f"{plan.worker} torch and {plan.opencv} OpenCV per worker, {plan.batcher} per pass\n"
        f"CPU s per 8-frame request ({fx.dtype}): decode + flow + crops {prep / n:.2f} "
        f"({plan.opencv} OpenCV thread(s))"
    )
    for threads in sorted({1, plan.batcher}):
        use_torch_threads(threads)
        alone = pooled = 0.0
        for batch in batches:
            t = cpu()
            fx.embed(batch)
            alone += cpu() - t
            t = cpu()
            fx.embed({s: np.concatenate([x] * 8) for s, x in batch.items()})
            pooled += (cpu() - t) / 8
        print(
            f"backbones on {threads} torch thread(s): alone {alone / n:.2f}, "
            f"inside a 64-frame pass {pooled / n:.2f}"
        )
    tmp = tempfile.TemporaryDirectory()
    try:
        run = Path(args.run[0]) if args.run else build_run(Path(tmp.name), clips)
        data = [c.read_bytes() for c in clips]
        answered = [0]
        settings = Settings(
            runs=[run],
            workers=args.workers,
            queue_size=args.queue_size,
            torch_threads=args.torch_threads,
        )
        with TestClient(create_app(settings)) as http:
            deadline = time.monotonic() + args.duration

            def post(i: int) -> None:
                while time.monotonic() < deadline:
                    r = http.post(
                        "/v1/predict",
                        params={"max_frames": 8},
                        files={"file": ("v", data[i % len(data)])},
                    )
                    answered[0] += r.status_code == 200
                    i += 1

            clients = max(args.sweep_clients)
            threads = [threading.Thread(target=post, args=(i,)) for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            (batcher,) = http.app.state.service.context.batchers.values()  # type: ignore[attr-defined]
            sizes = [p.frames for p in batcher.passes]
            waits = [w for p in batcher.passes for w in p.waits]
    finally:
        tmp.cleanup()
    print(
        f"{clients} clients, {args.workers} workers, {args.duration:g} s: {answered[0]} answers "
        f"in {len(sizes)} passes of {min(sizes, default=0)} to {max(sizes, default=0)} frames "
        f"(mean {np.mean(sizes) if sizes else 0:.1f}); frames waited {pct(waits, 50):.3f} s "
        f"(p50), {pct(waits, 95):.3f} s (p95) for their pass"
    )
    return 0


def sweep(args: argparse.Namespace, clips: list[Path], params: dict[str, Any]) -> int:
    import json
    import platform

    tmp = tempfile.TemporaryDirectory()
    try:
        if not args.run:
            t = time.perf_counter()
            args.run = [str(build_run(Path(tmp.name), clips))]
            print(f"built the run to serve in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rows = []  # interleaved (off, on at each load, repeated): drift hits both alike
        for repeat in range(args.repeats):
            for n in args.sweep_clients:
                for batch in (0, args.batch_max_frames):
                    row = load_once(args, clips, params, n, batch)
                    rows.append({"repeat": repeat, **row})
                    print(
                        f"batcher {batch or 'off'}, {n} clients: "
                        f"{row['answers_per_s']:.2f} answers/s",
                        file=sys.stderr,
                    )
    finally:
        tmp.cleanup()
    by: dict[tuple[bool, int], dict[str, Any]] = {}
    for key in {(r["batch_max_frames"] > 0, r["clients"]) for r in rows}:
        same = [r for r in rows if (r["batch_max_frames"] > 0, r["clients"]) == key]
        lat = [x for r in same for x in r["latencies_s"]]
        by[key] = {
            "answers_per_s": float(np.median([r["answers_per_s"] for r in same])),
            "p50_s": pct(lat, 50),
            "p95_s": pct(lat, 95),
            "server_cpu_s_per_answer": sum(r["server_cpu_s"] for r in same)
            / max(1, sum(r["answered"] for r in same)),
            "server_peak_rss_mib": max(r["server_peak_rss_mib"] for r in same),
        }
    print(
        f"serve load sweep: {args.max_frames}-frame requests, workers={args.workers}, "
        f"queue={args.queue_size}, {args.duration:g} s per setting and repeat, "
        f"median of {args.repeats} repeat(s), {len(clips)} clips, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| clients | batcher | answers/s | p50 (s) | p95 (s) | server CPU s / answer | "
        "peak RSS (MiB) | answers/s vs no batcher |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (on, n), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = by.get((False, n))
        ratio = r["answers_per_s"] / base["answers_per_s"] if base and base["answers_per_s"] else 0
        print(
            f"| {n} | {f'on ({args.batch_max_frames} frames)' if on else 'off'} "
            f"| {r['answers_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} "
            f"| {r['server_cpu_s_per_answer']:.2f} | {r['server_peak_rss_mib']:.0f} "
            f"| {ratio:.2f}x |"
        )
    if args.json:
        meta = {
            "max_frames": args.max_frames,
            "workers": args.workers,
            "queue_size": args.queue_size,
            "duration_s": args.duration,
            "clips": [c.name for c in clips],
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "batch_max_wait_s": args.batch_max_wait_s,
            "repeats": args.repeats,
        }
        Path(args.json).write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
    bad = sum(n for r in rows for c, n in r["status_codes"].items() if c not in ("200", "503"))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--run", action="append", default=[], help="run directory (repeatable; --sweep: optional)"
    )
    ap.add_argument("--clips", nargs="+", required=True, help="video files to upload")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--max-frames", type=int, default=16, help="frame subsampling per request")
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="server inference workers")
    ap.add_argument("--queue-size", type=int, default=8, help="server queue size")
    ap.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--server-log", default=None, help="file for the server's output")
    ap.add_argument(
        "--hostile", type=int, default=0, help="misbehaving clients of each kind beside the others"
    )
    ap.add_argument("--sweep", action="store_true", help="batcher off and on, at several loads")
    ap.add_argument(
        "--explain", action="store_true", help="what bounds the batcher (CPU split, pass sizes)"
    )
    ap.add_argument("--sweep-clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--batch-max-frames", type=int, default=64, help="--sweep: the batcher's size")
    ap.add_argument("--batch-max-wait-s", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="--sweep: runs of every setting")
    ap.add_argument("--json", default=None, help="--sweep: write the figures to this file")
    args = ap.parse_args(argv)
    if not args.run and not (args.sweep or args.explain):
        ap.error("--run is required (or --sweep, which builds a run when none is given)")

    clips = [Path(c) for c in args.clips]
    for c in clips:
        if not c.is_file():
            ap.error(f"--clips: no such file {str(c)!r}")
    params: dict[str, Any] = {"max_frames": args.max_frames, "top_k": 3}
    if args.stride:
        params["stride"] = args.stride

    if args.explain:
        return explain(args, clips)
    if args.sweep:
        return sweep(args, clips, params)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, env=HOSTILE_ENV if args.hostile else None)
    records: list[Record] = []
    bad: list[Record] = []
    flood: list[Path] = []
    tmp = tempfile.TemporaryDirectory()
    if args.hostile:
        flood = [tiny_frame_flood(Path(tmp.name) / "flood.mp4")]
    peak_sampled = 0
    try:
        wait_ready(base, proc, args.ready_timeout)
        idle_rss = rss_kib(proc.pid, "VmRSS")
        load_before = os.getloadavg()[0]
        lock = threading.Lock()
        deadline = time.monotonic() + args.duration
        threads = [
            threading.Thread(target=client, args=(i, base, clips, params, deadline, records, lock))
            for i in range(args.clients)
        ]
        video = clips[0].read_bytes()
        for i in range(args.hostile):
            for kind in ("slow", "stall", "oversize-declared", "oversize-streamed"):
                threads.append(
                    threading.Thread(
                        target=hostile, args=(kind, port, video, deadline, bad, lock), daemon=True
                    )
                )
            # no max_frames: the service's own frame limit applies
            threads.append(
                threading.Thread(
                    target=client, args=(i, base, flood, {"top_k": 1}, deadline, bad, lock)
                )
            )
        t_start = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 180:
            peak_sampled = max(peak_sampled, rss_kib(proc.pid, "VmRSS"))
            time.sleep(0.2)
        wall = time.monotonic() - t_start
        peak = max(rss_kib(proc.pid, "VmHWM"), peak_sampled)
    finally:
        tmp.cleanup()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    codes = collections.Counter(r.status for r in records)
    ok = [r for r in records if r.status == 200]
    lat = [r.seconds for r in ok]
    stage = {
        k: float(np.mean([r.timings.get(k, 0.0) for r in ok])) if ok else float("nan")
        for k in ("upload", "queue", "decode_extract", "head", "total")
    }
    five_xx = sum(n for c, n in codes.items() if c >= 500 and c != 503)
    print(
        f"serve load: {args.clients} clients, {args.duration:g} s, max_frames={args.max_frames}, "
        f"workers={args.workers}, queue={args.queue_size}, {len(clips)} clips, "
        f"{os.cpu_count()} CPUs, load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print("| metric | value |")
    print("| --- | --- |")
    rows = [
        ("requests", f"{len(records)}"),
        ("status codes", ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))),
        ("5xx other than 503", f"{five_xx}"),
        ("throughput (200/s)", f"{len(ok) / wall:.2f}"),
        ("latency p50 (s)", f"{pct(lat, 50):.2f}"),
        ("latency p95 (s)", f"{pct(lat, 95):.2f}"),
        ("latency max (s)", f"{max(lat) if lat else float('nan'):.2f}"),
        ("server queue wait, mean (s)", f"{stage['queue']:.2f}"),
        ("server decode+extract, mean (s)", f"{stage['decode_extract']:.2f}"),
        ("server head, mean (s)", f"{stage['head']:.3f}"),
        ("server RSS idle / peak (MiB)", f"{idle_rss / 1024:.0f} / {peak / 1024:.0f}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    if bad:
        print("\n| hostile client | requests | status codes | p50 (s) | p95 (s) |")
        print("| --- | ---: | --- | ---: | ---: |")
        for kind in sorted({r.clip for r in bad}):
            rs = [r for r in bad if r.clip == kind]
            kc = collections.Counter(r.status for r in rs)
            secs = [r.seconds for r in rs]
            print(
                f"| {kind} | {len(rs)} | {', '.join(f'{c}: {n}' for c, n in sorted(kc.items()))} "
                f"| {pct(secs, 50):.2f} | {pct(secs, 95):.2f} |"
            )
        five_xx += sum(1 for r in bad if r.status >= 500 and r.status != 503)
    by_clip: dict[str, list[float]] = collections.defaultdict(list)
    for r in ok:
        by_clip[r.clip].append(r.seconds)
    if by_clip:
        print("\n| clip | answered | p50 (s) | p95 (s) |")
        print("| --- | --- | --- | --- |")
        for name, values in sorted(by_clip.items()):
            print(f"| {name} | {len(values)} | {pct(values, 50):.2f} | {pct(values, 95):.2f} |")
    return 1 if five_xx or codes.get(0) else 0


if __name__ == "__main__":
    sys.exit(main())
