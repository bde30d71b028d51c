"""S3 requests per video of ``extract --engine ray`` with the videos and the store on S3.

Starts moto's S3 server on 127.0.0.1 and a Ray instance on this machine, uploads the real clips,
extracts them from ``s3://videos/...`` into ``s3://features/store.zarr`` and counts every HTTP
request the server answers, by method and by what it touched (the videos' bucket, the store's
per-video groups, the store's index and root). The figures feed the cost and latency side of a
Kinetics-scale estimate (``docs/scaling-ray.md``)::

    python benchmarks/ray_s3_requests.py --clips 7 --max-frames 8
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections import Counter
from pathlib import Path

import _common

REQUEST = logging.getLogger("werkzeug")


class Requests(logging.Handler):
    """Counts the request lines moto's server (werkzeug) logs: ``"GET /bucket/key HTTP/1.1"``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[tuple[str, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug colours some
        try:
            line = text.split('"')[1]
            method, target = line.split(" ")[:2]
        except (IndexError, ValueError):
            return
        path = target.split("?")[0].strip("/")
        bucket, _, key = path.partition("/")
        if bucket == "videos":
            what = "videos"
        elif "/videos/" in f"/{key}":
            what = "store: video groups"
        elif "/index/" in f"/{key}":
            what = "store: index"
        else:
            what = "store: root"
        self.counts[(method, what)] += 1


def main() -> None:
    p = _common.parser(__doc__)
    p.add_argument("--clips", type=int, default=7)
    p.add_argument("--max-frames", type=int, default=8)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    os.environ.update(env)  # before fsspec is imported: it reads FSSPEC_S3_* then
    import ray
    import s3fs
    from moto.server import ThreadedMotoServer

    counter = Requests()
    REQUEST.setLevel(logging.INFO)
    REQUEST.addHandler(counter)
    REQUEST.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    from extractor.pipeline import run_extract
    from extractor.ray_engine import RayOptions
    from extractor.spec import BackboneSpec

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench")
    fs.mkdir("videos")
    fs.mkdir("features")
    clips = _common.real_clips(args.videos)[: args.clips]
    for clip in clips:
        fs.put_file(str(clip), f"videos/all/{clip.name}")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    counter.counts.clear()
    start = time.perf_counter()
    summary = run_extract(
        ["s3://videos/all/"],
        "s3://features/store.zarr",
        BackboneSpec(weights="random", arch="resnet18"),
        device="cpu",
        max_frames=args.max_frames,
        progress=False,
        engine="ray",
        ray=RayOptions(runtime_env={"env_vars": env}),
    )
    wall = time.perf_counter() - start
    ray.shutdown()
    server.stop()
    assert summary.ok and len(summary.complete) == len(clips), summary.format()
    n = len(clips)
    total = sum(counter.counts.values())
    print(
        f"{n} videos ({args.max_frames} frames each, 2 streams) from s3://videos into "
        f"s3://features/store.zarr on moto {endpoint}: {total} requests, {total / n:.1f} per "
        f"video; {wall:.1f} s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print("| method | touches | requests | per video |\n| --- | --- | ---: | ---: |")
    for (method, what), k in sorted(counter.counts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {method} | {what} | {k} | {k / n:.1f} |")
    out = Path(__file__).resolve().parent / "results" / f"ray_s3_requests_{n}.json"
    out.parent.mkdir(exist_ok=True)
    rows = [{"method": m, "touches": w, "requests": k} for (m, w), k in counter.counts.items()]
    record = {"videos": n, "max_frames": args.max_frames, "total": total, "rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
