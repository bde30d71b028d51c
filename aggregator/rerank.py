"""Exact re-ranking of a compressed index's candidates from the full embeddings on disk.

A compressed faiss index (IVF-PQ) fits its share of the memory budget by keeping a few bytes per
video, and its approximate distances miss some of the true nearest neighbours. Beside it, the
run directory keeps every indexed embedding, L2-normalised, as a float16 ``.npy`` file that is
read through a memory map: a search asks the compressed index for :data:`CANDIDATES` times the
wanted neighbours and orders those candidates by their exact cosine similarity, reading only
their rows. Memory stays what the compressed index takes; the file costs ``2 e`` bytes a video
of disk (the same as IndexRefine's flat codes in float16, which faiss would hold in memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

VECTORS_FILE = "index_vectors.npy"
CANDIDATES = 10  # candidates taken from the compressed index per neighbour wanted

__all__ = [
    "CANDIDATES",
    "VECTORS_FILE",
    "VectorFile",
    "VectorsWriter",
    "open_vectors",
    "rerank",
    "write_vectors",
]


class VectorsWriter:
    """Writes ``n`` normalised embeddings ``[*, e]``, block by block, as a float16 ``.npy`` file:
    plain writes (no memory map, so that the pages written never count as the process's memory),
    to a temporary file renamed into place by :meth:`close` once all ``n`` rows are in."""

    def __init__(self, path: str | Path, n: int, e: int) -> None:
        self.path, self.n, self.e, self.done = Path(path), n, e, 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by close()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f2")), "shape": (n, e)}
        np.lib.format.write_array_header_2_0(self._file, {**header, "fortran_order": False})

    def add(self, block: np.ndarray) -> None:
        if block.ndim != 2 or block.shape[1] != self.e or self.done + len(block) > self.n:
            raise ValueError(
                f"embedding block of shape {block.shape} does not fit rows {self.done}.. of "
                f"[{self.n}, {self.e}] in {str(self.path)!r}"
            )
        self._file.write(np.ascontiguousarray(block, dtype="<f2").tobytes())
        self.done += len(block)

    def abort(self) -> None:
        """Close and remove the unfinished file."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def close(self) -> Path:
        self._file.close()
        if self.done != self.n:
            self.abort()
            raise ValueError(
                f"{self.done} embeddings written to {str(self.path)!r}, {self.n} expected"
            )
        self._tmp.replace(self.path)
        return self.path


def write_vectors(path: str | Path, blocks: Iterable[np.ndarray], n: int, e: int) -> Path:
    """Write ``n`` normalised embeddings, given block by block, to ``path``."""
    writer = VectorsWriter(path, n, e)
    try:
        for block in blocks:
            writer.add(block)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class VectorFile:
    """Rows of a float16 ``[n, e]`` ``.npy`` file, read by ``pread`` as they are asked for: no
    memory map, so that a long-running service's memory does not grow with the rows it has read
    (the kernel's page cache keeps what is read often)."""

    def __init__(self, path: str | Path, n: int, e: int) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if tuple(shape) != (n, e) or fortran or dtype != np.dtype("<f2"):
            raise ValueError(
                f"{str(self.path)!r} holds {dtype} embeddings of shape {tuple(shape)}, the index "
                f"needs float16 [{n}, {e}]"
            )
        self.shape = (n, e)
        self._row_bytes = 2 * e
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` as float32 ``[len(rows), e]``, in the order given."""
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for i, row in enumerate(np.asarray(rows, dtype=np.int64)):
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {row} of {str(self.path)!r}, which has {self.shape[0]}")
            raw = os.pread(self._fd, self._row_bytes, self._offset + int(row) * self._row_bytes)
            out[i] = np.frombuffer(raw, dtype="<f2")
        return out


def open_vectors(path: str | Path, n: int, e: int) -> VectorFile:
    """The embeddings file, checked against the index's ``[n, e]``."""
    return VectorFile(path, n, e)


def rerank(
    vectors: VectorFile, query: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``rows`` (``-1``: none) ordered by exact inner product with the normalised
    ``query``, highest first (ties keep the index order); returns ``(similarities, rows)``."""
    rows = np.asarray(rows[rows >= 0], dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.float32), rows
    order = np.argsort(rows)  # read the file in row order
    sims = np.empty(len(rows), dtype=np.float32)
    sims[order] = vectors.read(rows[order]) @ query.astype(np.float32)
    best = np.lexsort((rows, -sims))
    return sims[best], rows[best]
