"""Streaming uploads: early 413, removal of the temporary file whatever happens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from starlette.requests import ClientDisconnect, Request

from api.service.uploads import UploadError, receive_upload, sniff_container

BOUNDARY = "xXxBoundaryxXx"


def multipart(file_bytes: bytes | None, fields: dict[str, str] | None = None) -> bytes:
    parts = []
    for name, value in (fields or {}).items():
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{head}{value}\r\n".encode())
    if file_bytes is not None:
        parts.append(
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="../../etc/x"\r\n'
            "Content-Type: video/mp4\r\n\r\n".encode()
            + file_bytes
            + b"\r\n"
        )
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


class Body:
    """An ASGI ``receive`` that hands out a body in chunks and counts what was read."""

    def __init__(self, chunks: Iterator[bytes], disconnect_after: int | None = None) -> None:
        self.chunks = chunks
        self.read = 0
        self.disconnect_after = disconnect_after

    async def __call__(self) -> dict:
        if self.disconnect_after is not None and self.read >= self.disconnect_after:
            return {"type": "http.disconnect"}
        chunk = next(self.chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        self.read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}


def request(body: Body, headers: dict[str, str] | None = None) -> Request:
    hdrs = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})}
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/predict",
        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()],
    }
    return Request(scope, body)  # type: ignore[arg-type]


def chunked(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _receive(req: Request, dest: Path, max_bytes: int, **kw) -> tuple[bytes, dict, str]:
    async with receive_upload(req, dest, max_bytes=max_bytes, **kw) as up:
        assert up.path is not None and up.path.parent == dest
        return up.path.read_bytes(), up.fields, str(up.filename)


def test_round_trip_with_fields(tmp_path: Path) -> None:
    data = bytes(range(256)) * 50
    body = Body(chunked(multipart(data, {"top_k": "3", "model": "r1"}), 777))
    got, fields, filename = asyncio.run(_receive(request(body), tmp_path, 1 << 20))
    assert got == data
    assert fields == {"top_k": "3", "model": "r1"}
    assert filename == "../../etc/x"  # kept as a label only
    assert list(tmp_path.iterdir()) == []


def test_oversize_stops_reading_at_the_limit(tmp_path: Path) -> None:
    limit = 20_000
    payload = multipart(b"\0" * 10_000_000)
    body = Body(chunked(payload, 1000))
    with pytest.raises(UploadError) as err:
        asyncio.run(_receive(request(body), tmp_path, limit))
    assert err.value.status_code == 413
    # it stopped within one chunk of the limit, not after reading 10 MB
    assert body.read <= limit // 1000 + 2
    assert list(tmp_path.iterdir()) == []


def test_declared_oversize_is_refused_before_reading(tmp_path: Path) -> None:
    body = Body(chunked(multipart(b"\0" * 500_000)))
    req = request(body, {"content-length": str(10**9)})
    with pytest.raises(UploadError) as err:
        asyncio.run(_receive(req, tmp_path, 100_000))
    assert err.value.status_code == 413 and body.read == 0
    assert list(tmp_path.iterdir()) == []


def test_client_disconnect_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    body = Body(chunked(multipart(b"\1" * 50_000), 1000), disconnect_after=10)
    with pytest.raises(ClientDisconnect):
        asyncio.run(_receive(request(body), tmp_path, 1 << 20))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (multipart(b""), 400),  # empty file
        (b"--" + BOUNDARY.encode() + b'\r\nContent-Disposition: form-data; name="x"\r\n\r\n1', 400),
        (multipart(b"abc")[: -len(f"\r\n--{BOUNDARY}--\r\n") - 1], 400),  # ends inside the file
        (multipart(None, {"top_k": "3"}), 422),  # no file part
        (multipart(b"abc", {"f": "x" * 10_000}), 400),  # a huge form field
    ],
)
def test_bad_bodies(tmp_path: Path, payload: bytes, status: int) -> None:
    with pytest.raises(UploadError) as err:
        asyncio.run(_receive(request(Body(chunked(payload))), tmp_path, 1 << 20))
    assert err.value.status_code == status, err.value.reason
    assert list(tmp_path.iterdir()) == []


def test_not_multipart_is_415(tmp_path: Path) -> None:
    req = request(Body(iter([b"{}"])), {"content-type": "application/json"})
    with pytest.raises(UploadError) as err:
        asyncio.run(_receive(req, tmp_path, 1000))
    assert err.value.status_code == 415


def test_file_held_until_its_job_ends(tmp_path: Path) -> None:
    fut: Future[None] = Future()

    async def go() -> Path:
        async with receive_upload(
            request(Body(chunked(multipart(b"video")))), tmp_path, max_bytes=1000
        ) as up:
            up.hold_until(fut)
            assert up.path is not None
            return up.path

    path = asyncio.run(go())
    assert path.exists()  # a worker still reads it
    fut.set_result(None)
    assert not path.exists()


def test_sniff_container(real_videos: list[Path], tmp_path: Path) -> None:
    kinds = {p.suffix: sniff_container(p) for p in real_videos}
    assert kinds == {".mp4": "mp4", ".avi": "avi"}
    text = tmp_path / "a.mp4"
    text.write_text("hello, not a video\n" * 100)
    assert sniff_container(text) is None
