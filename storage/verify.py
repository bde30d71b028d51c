"""Checking a store for damage (``framepool store verify``): every stream of every video read back
in a pool of threads, file reads and checksums releasing the GIL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storage.layout import CorruptVideoError


def find_damaged(
    video_ids: Sequence[str],
    check: Callable[[str], None],
    *,
    workers: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> list[dict[str, str]]:
    """Run ``check(video_id)`` for every video in ``workers`` threads and return those it found
    damaged (it raised :class:`CorruptVideoError`) as ``{"video_id", "key", "error"}``, in the
    order of ``video_ids``. ``progress`` is called with the number of videos checked so far."""
    done = [0]
    lock = threading.Lock()

    def one(vid: str) -> dict[str, str] | None:
        try:
            check(vid)
        except CorruptVideoError as exc:
            return {"video_id": vid, "key": exc.key, "error": str(exc)}
        finally:
            with lock:
                done[0] += 1
                if progress is not None:
                    progress(done[0])
        return None

    with ThreadPoolExecutor(max(1, min(workers, len(video_ids) or 1))) as pool:
        return [r for r in pool.map(one, video_ids) if r is not None]
