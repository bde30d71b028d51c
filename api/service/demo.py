"""Serve a run for a moment on a free local port and send it one clip (for the quickstart)."""

from __future__ import annotations

import contextlib
import json
import secrets
import shlex
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from api.service.app import create_app
from api.service.settings import Settings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(
    settings: Settings, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 300
) -> Iterator[str]:
    """Run the service under uvicorn in a background thread; yield its base URL, then stop it."""
    port = free_port(host) if port is None else port
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="framepool-demo-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the service did not start on {host}:{port} (see the log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the service did not start within {timeout:g} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def curl_command(base_url: str, clip: str | Path, *, top_k: int, max_frames: int | None) -> str:
    query = f"top_k={top_k}" + ("" if max_frames is None else f"&max_frames={max_frames}")
    url = f"{base_url}/v1/predict?{query}"
    return f"curl -s -F file=@{shlex.quote(str(clip))} {shlex.quote(url)}"


def post_file(url: str, path: Path, *, timeout: float = 300) -> tuple[int, Any]:
    """POST ``path`` as multipart field ``file`` (standard library only); (status, JSON body)."""
    boundary = secrets.token_hex(16)
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="file"; filename="clip"\r\n',
            b"Content-Type: application/octet-stream\r\n\r\n",
            path.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


def demo_request(
    run_dir: str | Path,
    clip: str | Path,
    *,
    store: str | Path | None = None,
    top_k: int = 3,
    max_frames: int | None = 16,
    timeout: float = 300,
) -> dict[str, Any]:
    """Serve ``run_dir`` on a free port, POST ``clip`` to /v1/predict, stop the server.

    Returns ``{"url", "curl", "status", "response"}``: the server's address while it ran, the
    equivalent curl command (for ``framepool serve --run RUN_DIR`` on port 8000), the HTTP
    status and the JSON answer.
    """
    clip = Path(clip)
    settings = Settings(runs=[Path(run_dir)], store=None if store is None else Path(store))
    with serve_in_thread(settings, timeout=timeout) as base_url:
        params: dict[str, int] = {"top_k": top_k}
        if max_frames is not None:
            params["max_frames"] = max_frames
        url = f"{base_url}/v1/predict?{urllib.parse.urlencode(params)}"
        status, answer = post_file(url, clip, timeout=timeout)
    return {
        "url": base_url,
        "curl": curl_command("http://127.0.0.1:8000", clip, top_k=top_k, max_frames=max_frames),
        "status": status,
        "response": answer,
    }
