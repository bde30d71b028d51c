"""Streaming multipart uploads into a private temporary file, with a size limit.

The request body is parsed as it arrives (python-multipart's streaming parser); the ``file`` part
goes straight into a fresh ``mkstemp`` file in the service's private upload folder, and the
upload is refused with 413 the moment it crosses the limit, not after it has all been read. The
client's filename is kept only as a label: it never becomes part of a path. Whatever happens
(a bad body, a client that goes away, an error later on), the temporary file is removed: at the
end of :func:`receive_upload`'s context, or, when a worker still reads it, when that job ends.

Disk and time are bounded for all uploads together: an :class:`UploadBudget` counts the bytes of
every upload file that exists (being received, or waiting for its job), and an upload that would
take it past its limit is refused with 503 and Retry-After; an upload that sends nothing for
``idle_timeout_s``, or takes longer than ``timeout_s`` in all, is dropped with 408. A client that
goes away mid-body is logged at info level and answered 499 (nobody reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    MultipartState,
    parse_options_header,
)
from starlette.requests import ClientDisconnect, Request

log = logging.getLogger(__name__)

MAX_FIELD_BYTES = 4096  # a form field (top_k, model, ...) is short
MAX_PARTS = 16
_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and small fields around the file


CLIENT_CLOSED = 499  # the client closed the connection before the answer (nginx's convention)


class UploadError(Exception):
    """An upload the service will not take; ``status_code`` is the HTTP status to answer with."""

    def __init__(
        self, status_code: int, reason: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason
        self.headers = headers


class UploadBudget:
    """Bytes all upload files may hold together; thread-safe (files are released by workers)."""

    def __init__(self, limit_bytes: int, retry_after_s: int = 2) -> None:
        if limit_bytes < 1:
            raise ValueError(f"upload budget must be >= 1 byte, got {limit_bytes!r}")
        self.limit = limit_bytes
        self.retry_after_s = retry_after_s
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def _full(self, n: int) -> UploadError:
        return UploadError(
            503,
            f"uploads in progress hold {self.used / 2**20:.1f} MiB of the service's "
            f"{self.limit / 2**20:g} MiB; {n / 2**20:.1f} MiB more do not fit, retry later",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def check(self, n: int) -> None:
        """Raise 503 when ``n`` more bytes would not fit now (nothing is reserved)."""
        with self._lock:
            fits = self._used + n <= self.limit
        if not fits:
            raise self._full(n)

    def take(self, n: int) -> None:
        """Reserve ``n`` bytes or raise 503."""
        with self._lock:
            if self._used + n <= self.limit:
                self._used += n
                return
        raise self._full(n)

    def give_back(self, n: int) -> None:
        with self._lock:
            self._used -= n
            assert self._used >= 0, self._used


@dataclass
class Upload:
    """A received upload: where its bytes are, how many, and the other form fields."""

    path: Path | None
    size: int = 0
    filename: str | None = None
    content_type: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    budget: UploadBudget | None = None
    _held_by: Future[Any] | None = None
    _reserved: int = 0

    def hold_until(self, future: Future[Any]) -> None:
        """Keep the file until ``future`` is done (a worker reads it), then remove it."""
        self._held_by = future

    def reserve(self, n: int) -> None:
        """Count ``n`` more bytes of this upload against the budget (503 when they do not fit)."""
        if self.budget is not None:
            self.budget.take(n)
            self._reserved += n

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self.budget is not None and self._reserved:
            self.budget.give_back(self._reserved)
            self._reserved = 0


def make_upload_dir(parent: str | Path | None = None) -> Path:
    """A fresh private (0700) folder for uploads in flight."""
    return Path(tempfile.mkdtemp(prefix="framepool-uploads-", dir=parent))


def is_multipart(request: Request) -> bool:
    ctype, _ = parse_options_header(request.headers.get("content-type"))
    return ctype == b"multipart/form-data"


class _Receiver:
    """Callbacks of one multipart parse: file part to disk, small fields to memory."""

    def __init__(self, upload: Upload, dest_dir: Path, max_bytes: int, file_field: str) -> None:
        self.upload = upload
        self.dest_dir = dest_dir
        self.max_bytes = max_bytes
        self.file_field = file_field
        self.fd: int | None = None
        self.n_parts = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    # python-multipart callbacks ---------------------------------------------------------------
    def on_part_begin(self) -> None:
        self.n_parts += 1
        if self.n_parts > MAX_PARTS:
            raise UploadError(400, f"too many multipart parts (more than {MAX_PARTS})")
        self._headers = {}
        self._name = None
        self._is_file = False
        self._value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise UploadError(400, "a multipart part has no 'form-data' name")
        name = params[b"name"].decode("utf-8", "replace")
        self._name = name
        if name == self.file_field:
            if self.fd is not None:
                raise UploadError(400, f"more than one {self.file_field!r} part")
            self._is_file = True
            raw_name = params.get(b"filename")
            self.upload.filename = (
                None if raw_name is None else raw_name.decode("utf-8", "replace")[:255]
            )
            ctype = self._headers.get(b"content-type")
            self.upload.content_type = None if ctype is None else ctype.decode("latin-1")[:255]
            fd, path = tempfile.mkstemp(dir=self.dest_dir, prefix="upload-", suffix=".bin")
            self.fd = fd
            self.upload.path = Path(path)
        elif b"filename" in params:
            raise UploadError(400, f"unexpected file part {name!r}; send the video as 'file'")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._is_file:
            if self.upload.size + n > self.max_bytes:
                raise UploadError(
                    413, f"upload larger than the limit of {self.max_bytes / 2**20:g} MiB"
                )
            assert self.fd is not None
            self.upload.reserve(n)
            view = memoryview(data)[start:end]
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            self.upload.size += n
        else:
            if len(self._value) + n > MAX_FIELD_BYTES:
                raise UploadError(400, f"form field {self._name!r} is too long")
            self._value += data[start:end]

    def on_part_end(self) -> None:
        if self._is_file:
            assert self.fd is not None
            os.close(self.fd)
            self.fd = -1  # closed; a second file part is still refused
        elif self._name is not None:
            if self._name in self.upload.fields:
                raise UploadError(400, f"form field {self._name!r} given twice")
            try:
                self.upload.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(400, f"form field {self._name!r} is not UTF-8") from None

    def close(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextlib.asynccontextmanager
async def receive_upload(
    request: Request,
    dest_dir: Path,
    *,
    max_bytes: int,
    file_field: str = "file",
    require_file: bool = True,
    budget: UploadBudget | None = None,
    idle_timeout_s: float | None = None,
    timeout_s: float | None = None,
) -> AsyncIterator[Upload]:
    """Stream a ``multipart/form-data`` body to a temporary file; remove it when done.

    Raises :class:`UploadError` (400 malformed or empty, 408 too slow, 413 too large, 415 not
    multipart, 422 no ``file`` part, 499 the client went away, 503 over ``budget``) before
    yielding. The file is removed on leaving the context, or when the future given to
    :meth:`Upload.hold_until` finishes, whichever is later.
    """
    upload = Upload(path=None, budget=budget)
    try:
        await _read_body(
            request, upload, dest_dir, max_bytes, file_field, idle_timeout_s, timeout_s
        )
        if upload.path is None and require_file:
            raise UploadError(422, f"multipart field {file_field!r} (the video file) is missing")
        if upload.path is not None and upload.size == 0:
            raise UploadError(400, "the uploaded file is empty")
        yield upload
    finally:
        held = upload._held_by
        if held is not None and not held.done():
            held.add_done_callback(lambda _fut: upload.remove())
        else:
            upload.remove()


async def _chunks(
    request: Request, idle_timeout_s: float | None, timeout_s: float | None
) -> AsyncIterator[bytes]:
    """The body's chunks; 408 when one takes longer than ``idle_timeout_s`` to come, or the
    whole body longer than ``timeout_s``."""
    stream = request.stream().__aiter__()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        wait = idle_timeout_s
        if deadline is not None:
            left = deadline - time.monotonic()
            wait = left if wait is None else min(wait, left)
        try:
            if wait is None:
                chunk = await stream.__anext__()
            else:
                chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.0))
        except StopAsyncIteration:
            return
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise UploadError(
                    408, f"the upload took longer than the limit of {timeout_s:g} s"
                ) from None
            raise UploadError(
                408, f"the upload sent nothing for {idle_timeout_s:g} s; dropped"
            ) from None
        yield chunk


async def _read_body(
    request: Request,
    upload: Upload,
    dest_dir: Path,
    max_bytes: int,
    file_field: str,
    idle_timeout_s: float | None = None,
    timeout_s: float | None = None,
) -> None:
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        raise UploadError(
            415,
            f"expected a multipart/form-data body with the video in field {file_field!r}, "
            f"got content type {ctype.decode('latin-1')!r}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    limit = max_bytes + _OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and length.isdigit():
        if int(length) > limit:
            raise UploadError(413, f"upload larger than the limit of {max_bytes / 2**20:g} MiB")
        if upload.budget is not None:
            upload.budget.check(int(length))
    receiver = _Receiver(upload, dest_dir, max_bytes, file_field)
    callbacks: Any = {
        "on_part_begin": receiver.on_part_begin,
        "on_part_data": receiver.on_part_data,
        "on_part_end": receiver.on_part_end,
        "on_header_field": receiver.on_header_field,
        "on_header_value": receiver.on_header_value,
        "on_header_end": receiver.on_header_end,
        "on_headers_finished": receiver.on_headers_finished,
    }
    t0 = time.perf_counter()
    received = 0
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in _chunks(request, idle_timeout_s, timeout_s):
            received += len(chunk)
            if received > limit:
                raise UploadError(413, f"upload larger than the limit of {max_bytes / 2**20:g} MiB")
            if chunk:
                parser.write(chunk)
        parser.finalize()
        if parser.state != MultipartState.END:
            raise UploadError(400, "multipart body ended before its closing boundary")
    except MultipartParseError as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        log.info("client went away during an upload (%d bytes received)", received)
        raise UploadError(
            CLIENT_CLOSED, f"the client went away during the upload ({received} bytes received)"
        ) from None
    finally:
        receiver.close()
    upload.seconds = time.perf_counter() - t0


def sniff_container(path: str | Path) -> str | None:
    """The container a file's first bytes announce (``"mp4"``, ``"avi"``, ...), or None.

    Used only to tell a broken video (422) from something that is not a video at all (415) when
    the decoder refuses a file.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "asf"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "mpeg"
    if len(head) >= 377 and head[0] == 0x47 and head[188] == 0x47 and head[376] == 0x47:
        return "mpegts"
    return None
