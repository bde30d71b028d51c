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

from collections.abc import Iterable
from pathlib import Path

import numpy as np

VECTORS_FILE = "index_vectors.npy"
CANDIDATES = 10  # candidates taken from the compressed index per neighbour wanted

__all__ = ["CANDIDATES", "VECTORS_FILE", "open_vectors", "rerank", "write_vectors"]


def write_vectors(path: str | Path, blocks: Iterable[np.ndarray], n: int, e: int) -> Path:
    """Write ``n`` normalised embeddings ``[*, e]`` given block by block to ``path`` (float16),
    through a temporary file renamed into place once complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, e))
    done = 0
    for block in blocks:
        if block.ndim != 2 or block.shape[1] != e or done + len(block) > n:
            raise ValueError(
                f"embedding block of shape {block.shape} does not fit rows {done}.. of [{n}, {e}]"
            )
        out[done : done + len(block)] = block
        done += len(block)
    if done != n:
        raise ValueError(f"{done} embeddings written to {str(path)!r}, {n} expected")
    out.flush()
    del out
    tmp.replace(path)
    return path


def open_vectors(path: str | Path, n: int, e: int) -> np.ndarray:
    """The embeddings file as a read-only memory map, checked against the index's ``[n, e]``."""
    vectors = np.load(path, mmap_mode="r")
    if vectors.shape != (n, e):
        raise ValueError(
            f"{str(path)!r} holds embeddings of shape {vectors.shape}, the index [{n}, {e}]"
        )
    return vectors


def rerank(
    vectors: np.ndarray, query: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates ``rows`` (``-1``: none) ordered by exact inner product with the normalised
    ``query``, highest first (ties keep the index order); returns ``(similarities, rows)``."""
    rows = np.asarray(rows[rows >= 0], dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.float32), rows
    order = np.argsort(rows)  # read the file in row order
    sims = np.empty(len(rows), dtype=np.float32)
    sims[order] = np.asarray(vectors[rows[order]], dtype=np.float32) @ query.astype(np.float32)
    best = np.lexsort((rows, -sims))
    return sims[best], rows[best]
