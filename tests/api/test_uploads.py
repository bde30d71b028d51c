"""Streaming uploads: early 413, removal of the temporary file whatever happens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from starlette.requests import Request

from api.service.uploads import UploadBudget, UploadError, receive_upload, sniff_container

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


def test_client_disconnect_mid_upload_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = Body(chunked(multipart(b"\1" * 50_000), 1000), disconnect_after=10)
    budget = UploadBudget(1 << 20)
    with caplog.at_level(logging.INFO, "api.service.uploads"), pytest.raises(UploadError) as err:
        asyncio.run(_receive(request(body), tmp_path, 1 << 20, budget=budget))
    assert err.value.status_code == 499
    assert list(tmp_path.iterdir()) == [] and budget.used == 0
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert gone and all(r.levelno == logging.INFO and r.exc_info is None for r in gone)


class StalledBody(Body):
    """Sends its chunks, then nothing at all (a client that stopped mid-body)."""

    async def __call__(self) -> dict:
        chunk = next(self.chunks, None)
        if chunk is None:
            await asyncio.sleep(3600)
        self.read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}


def test_a_stalled_upload_is_dropped_with_408(tmp_path: Path) -> None:
    data = multipart(b"\1" * 20_000)[:15_000]
    budget = UploadBudget(1 << 20)
    with pytest.raises(UploadError) as err:
        asyncio.run(
            _receive(
                request(StalledBody(chunked(data))),
                tmp_path,
                1 << 20,
                budget=budget,
                idle_timeout_s=0.2,
            )
        )
    assert err.value.status_code == 408 and "sent nothing for 0.2 s" in err.value.reason
    assert list(tmp_path.iterdir()) == [] and budget.used == 0


class SlowBody(Body):
    async def __call__(self) -> dict:
        await asyncio.sleep(0.05)
        return await super().__call__()


def test_a_slow_drip_upload_hits_the_total_timeout(tmp_path: Path) -> None:
    body = SlowBody(chunked(multipart(b"\1" * 20_000), 100))
    with pytest.raises(UploadError) as err:
        asyncio.run(_receive(request(body), tmp_path, 1 << 20, idle_timeout_s=5, timeout_s=0.3))
    assert err.value.status_code == 408 and "limit of 0.3 s" in err.value.reason
    assert list(tmp_path.iterdir()) == []


def test_uploads_in_progress_share_one_disk_budget(tmp_path: Path) -> None:
    budget = UploadBudget(60_000, retry_after_s=7)

    async def two_at_once() -> UploadError:
        first = request(Body(chunked(multipart(b"\1" * 40_000))))
        async with receive_upload(first, tmp_path, max_bytes=1 << 20, budget=budget) as up:
            held = budget.used
            assert up.path is not None and up.path.stat().st_size == held == 40_000
            second = request(Body(chunked(multipart(b"\2" * 40_000))))
            with pytest.raises(UploadError) as err:
                async with receive_upload(second, tmp_path, max_bytes=1 << 20, budget=budget):
                    pass
            assert len(list(tmp_path.iterdir())) == 1  # the refused one is gone already
            return err.value

    refused = asyncio.run(two_at_once())
    assert refused.status_code == 503 and refused.headers == {"Retry-After": "7"}
    assert "retry later" in refused.reason
    assert budget.used == 0 and list(tmp_path.iterdir()) == []
    # a declared length over what is left is refused before a byte is read
    budget.take(50_000)
    body = Body(chunked(multipart(b"\3" * 20_000)))
    with pytest.raises(UploadError) as err:
        asyncio.run(
            _receive(request(body, {"content-length": "20200"}), tmp_path, 1 << 20, budget=budget)
        )
    assert err.value.status_code == 503 and body.read == 0
    budget.give_back(50_000)


def test_a_held_upload_counts_until_its_job_ends(tmp_path: Path) -> None:
    budget = UploadBudget(1 << 20)
    fut: Future[None] = Future()

    async def go() -> None:
        body = request(Body(chunked(multipart(b"video"))))
        async with receive_upload(body, tmp_path, max_bytes=1000, budget=budget) as up:
            up.hold_until(fut)

    asyncio.run(go())
    assert budget.used == 5
    fut.set_result(None)
    assert budget.used == 0 and list(tmp_path.iterdir()) == []


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
