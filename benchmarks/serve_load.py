"""Load test of ``framepool serve``: concurrent clients uploading real clips for a fixed time.

Starts the service as a subprocess on a free local port, waits until /readyz answers, then runs
``--clients`` threads, each posting clips to /v1/predict in a loop until ``--duration`` seconds
have passed (a 503 is honoured: the client waits Retry-After, capped at 1 s). Prints a markdown
table: requests, status codes, throughput, latency percentiles of the answered requests, the
server's stage times, and the server's peak resident memory (VmHWM).

    python benchmarks/serve_load.py --run RUN_DIR --clips a.mp4 b.avi --clients 8 --duration 60 \
        --max-frames 16

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
    args: argparse.Namespace, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "api.cli", "serve", "--port", str(port)]
    for run in args.run:
        cmd += ["--run", run]
    cmd += ["--workers", str(args.workers), "--queue-size", str(args.queue_size)]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="run directory (repeatable)")
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
    args = ap.parse_args(argv)

    clips = [Path(c) for c in args.clips]
    for c in clips:
        if not c.is_file():
            ap.error(f"--clips: no such file {str(c)!r}")
    params: dict[str, Any] = {"max_frames": args.max_frames, "top_k": 3}
    if args.stride:
        params["stride"] = args.stride

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, HOSTILE_ENV if args.hostile else None)
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
