"""Videos on object storage: fsspec URLs (``s3://``, ``gs://``, ``az://``, ...) as inputs.

A URL is any input with a ``scheme://`` other than ``file://`` (whose path is taken as local).
It is opened through fsspec only: the decoder gets a Python file object, never the URL, so no
URL reaches FFmpeg's own protocols (see :mod:`extractor.decode`). Protocols need their fsspec
package (``s3fs`` for ``s3://``: ``pip install "framepool[s3]"``); credentials and endpoints come
from the usual places (environment, config files, ``FSSPEC_S3_ENDPOINT_URL``).
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import IO, Any

VideoPath = Path | str  # a local path (Path) or a URL (str)


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is a URL opened through fsspec (``file://`` counts as local)."""
    if isinstance(path, Path):
        return False
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_or_url(path: str | Path) -> VideoPath:
    """A URL as the string it is; anything else as a Path (``file://`` stripped)."""
    text = str(path)
    if is_url(text):
        return text
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text)


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for ``url``; ImportError naming the package a
    protocol needs."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ImportError(f"{url!r}: {exc} (for s3:// URLs: pip install 'framepool[s3]')") from exc
    except ValueError as exc:  # an unknown protocol
        raise ValueError(f"{url!r}: {exc}") from None


def open_url(url: str) -> IO[bytes]:
    """A seekable binary file object on ``url`` (read ahead in large blocks: decoders read
    sequentially)."""
    fs, path = filesystem(url)
    f: IO[bytes] = fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")
    return f


def url_info(url: str) -> dict[str, Any] | None:
    """fsspec's info of ``url`` (``type``, ``size``), None when nothing is there."""
    fs, path = filesystem(url)
    try:
        info: dict[str, Any] = fs.info(path)
    except FileNotFoundError:
        return None
    return info


def read_url_text(url: str) -> str:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        data: bytes = f.read()
    return data.decode("utf-8")


def list_url_folder(url: str, suffixes: frozenset[str]) -> list[str] | None:
    """Every file under the folder ``url`` (recursively) whose suffix is in ``suffixes``, as URLs,
    sorted; None when ``url`` is not a folder."""
    fs, path = filesystem(url)
    try:
        if not fs.isdir(path):
            return None
        found = fs.find(path)
    except FileNotFoundError:
        return None
    return [
        str(fs.unstrip_protocol(p))
        for p in sorted(found)
        if posixpath.splitext(p)[1].lower() in suffixes
    ]


def url_parent(url: str) -> str:
    """The URL of the folder holding ``url``."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def url_name(url: str) -> str:
    """The last part of ``url``'s path (its file name)."""
    return posixpath.basename(url.split("://", 1)[1].rstrip("/"))


def join_url(folder: str, entry: str) -> str:
    """``entry`` relative to the URL ``folder`` (an absolute URL entry is kept)."""
    if "://" in entry:
        return entry
    scheme, rest = folder.split("://", 1)
    if entry.startswith("/"):  # the bucket's root
        bucket = rest.split("/", 1)[0]
        return f"{scheme}://{bucket}{posixpath.normpath(entry)}"
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"
