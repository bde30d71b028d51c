"""``framepool serve``: the prediction service under uvicorn."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from api.cli import UsageError
from api.cli.options import Deprecated, positive_int


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve trained runs over HTTP (predict, similar videos, metrics)",
        description="Start the REST service: POST /v1/predict, POST /v1/similar, GET /v1/models, "
        "/healthz, /readyz, /metrics; OpenAPI docs at /docs.",
    )
    p.add_argument(
        "--run",
        dest="runs",
        action="append",
        required=True,
        metavar="DIR",
        help="run directory to serve (repeat for several; the first answers by default)",
    )
    p.add_argument(
        "--store", default=None, help="the runs' feature store: builds a missing similarity index"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--workers", type=int, default=1, help="inference workers (threads running models)"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=8,
        help="requests that may wait for a busy worker; one more is answered 503 (default 8)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=200.0, help="largest upload (default 200 MiB)"
    )
    p.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="default frames used per video, evenly spread (default: all; requests may override)",
    )
    p.add_argument(
        "--max-frames-limit",
        type=int,
        default=None,
        help="largest max_frames a request may ask for; longer videos are subsampled to it "
        "(bounds the work one request can cause; default 300, see GET /v1/limits)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device for extraction: cpu, cuda, auto (default cpu)"
    )
    p.add_argument(
        "--upload-dir",
        default=None,
        help="folder for uploads in flight (default: private temp dir)",
    )
    p.add_argument(
        "--threads",
        dest="torch_threads",
        type=positive_int,
        default=None,
        help="torch CPU threads of a forward pass: the batcher's, else each worker's (default: "
        "every core for the batcher, the cores divided among the workers without it)",
    )
    p.add_argument(
        "--batch-max-frames",
        type=int,
        default=None,
        metavar="N",
        help="frames of concurrent uploads one forward pass takes at most; 0 turns the batcher "
        "off (default 64, or FRAMEPOOL_BATCH_MAX_FRAMES)",
    )
    p.add_argument(
        "--batch-max-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds the batcher waits for other uploads' frames before a pass that is not "
        "full (default 0.01, or FRAMEPOOL_BATCH_MAX_WAIT_S)",
    )
    p.add_argument(
        "--torch-threads",
        dest="torch_threads",
        action=Deprecated,
        new="--threads",
        convert=positive_int,
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from api.service.settings import Settings

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port!r}")
    for run_dir in args.runs:
        if not Path(run_dir).is_dir():
            raise UsageError(f"--run {run_dir!r}: no such directory")
    if args.store is not None and not Path(args.store).exists():
        raise UsageError(f"--store {args.store!r}: no such store")
    try:
        return Settings(
            runs=[Path(r) for r in args.runs],
            store=None if args.store is None else Path(args.store),
            device=args.device,
            workers=args.workers,
            queue_size=args.queue_size,
            max_upload_mb=args.max_upload_mb,
            default_max_frames=args.max_frames,
            **(
                {} if args.max_frames_limit is None else {"max_frames_limit": args.max_frames_limit}
            ),
            upload_dir=None if args.upload_dir is None else Path(args.upload_dir),
            torch_threads=args.torch_threads,
            **{
                field: value
                for field, value in (
                    ("batch_max_frames", args.batch_max_frames),
                    ("batch_max_wait_s", args.batch_max_wait),
                )
                if value is not None  # else the setting's default or its environment variable
            },
        )
    except ValidationError as exc:
        errors = "; ".join(f"{_flag(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise UsageError(errors) from None


FLAGS = {
    "batch_max_wait_s": "--batch-max-wait",
    "torch_threads": "--threads",
    "default_max_frames": "--max-frames",
}


def _flag(loc: tuple[Any, ...]) -> str:
    """The flag of a settings field (``batch_max_frames`` -> ``--batch-max-frames``)."""
    name = "_".join(map(str, loc))
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from api.service.app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    print(f"framepool serve: http://{args.host}:{args.port}  (docs at /docs)")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        timeout_graceful_shutdown=10,
        access_log=False,  # the app writes its own access line (status, bytes, model)
    )
    return 0
