"""The memory budget of a process and the one builder of a store's derived caches.

:func:`memory_budget` is how many bytes of node data a process may hold
(``$FRAMEPOOL_MEMORY_BUDGET``, else a quarter of the physical memory); :func:`build_cache` computes
per-video summaries block by block in parallel threads and stores them under the store's ``/cache``
(kept in memory when the store is read-only). The node cache (:mod:`aggregator.node_cache`) and the
interval caches (:func:`aggregator.data.load_interval_cache`) are both built by it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from storage import FeatureStore

log = logging.getLogger(__name__)

BUDGET_ENV = "FRAMEPOOL_MEMORY_BUDGET"


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` -> bytes."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size in bytes (e.g. 8G, 512M)") from None


def memory_budget() -> int:
    """Bytes of node data a process may hold in memory: ``$FRAMEPOOL_MEMORY_BUDGET`` (e.g.
    ``8G``) when set, else a quarter of the physical memory."""
    env = os.environ.get(BUDGET_ENV)
    if env:
        return parse_bytes(env)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        total = 16 << 30
    return int(total) // 4


Summary = tuple[int, Callable[[np.ndarray], np.ndarray]]  # (rows M, frames [T, d] -> [M, d])


def build_cache(
    store: FeatureStore,
    stream: str,
    ids: list[str],
    d: int,
    summaries: Mapping[str, Summary],
    *,
    name: str,
    key: str,
    attrs: Mapping[str, Any],
    rows: int,
    node_chunks: bool,
    read_dtype: Any,
    progress: bool,
    budget: int,
    workers: int | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """The one cache builder (node and interval caches): every video's ``summaries``
    (``{array: (M, fn)}``, each ``[M, d]`` float16) computed block by block of ``rows`` videos in
    parallel threads, and its frame count. Stored under ``/cache/<name>/<key>`` with ``attrs`` when
    the store is writable (chunks of ``(rows, 1, d)`` uncompressed with a crc32c each when
    ``node_chunks``, else ``(rows, M, d)`` compressed), else kept in memory, which must then fit
    ``budget``. Returns the arrays (``n_frames`` included) and the frame counts."""
    n = len(ids)
    nbytes = sum(2 * n * m * d for m, _ in summaries.values())
    arrays: dict[str, Any]
    if store.mode != "r":
        shapes: dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]] = {
            a: ((n, m, d), "float16", (rows, 1 if node_chunks else m, d))
            for a, (m, _) in summaries.items()
        }
        shapes["n_frames"] = ((n,), "int64", (n,))
        arrays = store.write_cache(name, key, shapes, attrs, raw=node_chunks)
    elif nbytes <= budget:
        arrays = {a: np.empty((n, m, d), np.float16) for a, (m, _) in summaries.items()}
        arrays["n_frames"] = np.empty(n, np.int64)
    else:
        raise ValueError(
            f"the {stream!r} cache {name} of {store.path!r} ({nbytes / 2**30:.1f} GiB) must be "
            f"built but the store is read-only and it exceeds the memory budget "
            f"({budget / 2**30:.1f} GiB, ${BUDGET_ENV}); open the store writable once to build it"
        )
    n_frames = np.empty(n, dtype=np.int64)
    bar = tqdm(total=n, desc=f"{name} cache", disable=not progress, unit="video")
    lock = threading.Lock()

    def one_block(start: int) -> None:
        stop = min(start + rows, n)
        blocks = {a: np.empty((stop - start, m, d), np.float16) for a, (m, _) in summaries.items()}
        for i, vid in enumerate(ids[start:stop]):
            x = store.read(vid, stream, read_dtype)
            if x.shape[1] != d:
                raise ValueError(
                    f"stream {stream!r} of video {vid!r} has d={x.shape[1]}, others have d={d}"
                )
            for a, (_, fn) in summaries.items():
                blocks[a][i] = fn(x)
            n_frames[start + i] = x.shape[0]
        for a, block in blocks.items():
            arrays[a][start:stop] = block
        with lock:
            bar.update(stop - start)

    n_workers = workers or min(8, (os.cpu_count() or 1) + 2)
    starts = list(range(0, n, rows))
    try:
        with ThreadPoolExecutor(max(1, min(n_workers, len(starts)))) as pool:
            for fut in [pool.submit(one_block, s) for s in starts]:
                fut.result()
    finally:
        bar.close()
    arrays["n_frames"][...] = n_frames
    if store.mode != "r":
        store.finish_cache(name, key)
        log.info("cache %s/%s written (%d videos)", name, key, n)
    return arrays, n_frames
