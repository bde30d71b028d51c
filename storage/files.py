"""Plain file access under a store's root, for a local path or any fsspec URL.

The metadata index and the store checks read and write files that are not Zarr nodes (the index
parts) or read Zarr metadata documents directly (``zarr.json``, to rebuild the index without opening
every node through Zarr). A local path goes through ``os`` (fast listings of large folders, atomic
``os.replace``); a URL through its fsspec filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

import fsspec


class Files(Protocol):
    """The few file operations the store needs, relative to the store root."""

    url: str

    def list(self, folder: str) -> list[str]:
        """Names directly under ``folder`` (empty when it does not exist)."""
        ...

    def read(self, key: str) -> bytes | None:
        """The bytes of ``key``, or None when it does not exist."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Replace ``key`` with ``data`` in one step (readers see the old or the new bytes)."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Write ``key`` without the atomic replace (for files nothing reads until a later
        atomic write points to them, e.g. the chunks of a video not yet complete)."""
        ...

    def append(self, key: str, data: bytes) -> None:
        """Append ``data`` to ``key`` (created when missing)."""
        ...

    def remove(self, key: str) -> None:
        """Delete ``key``; no error when it is already gone."""
        ...

    def size(self, key: str) -> int | None:
        """Size of ``key`` in bytes, or None when it does not exist."""
        ...

    def remove_tree(self, folder: str) -> None:
        """Delete ``folder`` and everything under it; no error when it is absent."""
        ...


class LocalFiles:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = str(root)

    def list(self, folder: str) -> list[str]:
        try:
            return os.listdir(self.root / folder)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def append(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        # one write() of a line under O_APPEND: lines of concurrent appenders never interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()

    def size(self, key: str) -> int | None:
        try:
            return (self.root / key).stat().st_size
        except FileNotFoundError:
            return None

    def remove_tree(self, folder: str) -> None:
        shutil.rmtree(self.root / folder, ignore_errors=True)


class FsspecFiles:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def list(self, folder: str) -> list[str]:
        try:
            paths = self.fs.ls(self._path(folder), detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in paths]

    def read(self, key: str) -> bytes | None:
        try:
            data: bytes = self.fs.cat_file(self._path(key))
        except (FileNotFoundError, IsADirectoryError):
            return None
        return data

    def write(self, key: str, data: bytes) -> None:
        # object stores replace an object in one PUT; readers never see a partial object
        self.fs.pipe_file(self._path(key), data)

    def put(self, key: str, data: bytes) -> None:
        self.write(key, data)

    def append(self, key: str, data: bytes) -> None:
        with self.fs.open(self._path(key), "ab") as f:
            f.write(data)

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self._path(key)))
        except FileNotFoundError:
            return None

    def remove_tree(self, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(folder), recursive=True)


def files_for(path: str) -> Files:
    """Files under the store at ``path`` (a local path, ``file://`` or any fsspec URL)."""
    if "://" not in path:
        return LocalFiles(path)
    if path.startswith("file://"):
        return LocalFiles(path[len("file://") :])
    return FsspecFiles(path)
