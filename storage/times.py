"""Presentation times of a stream's stored rows, and their fallback for stores written without.

Extraction records, per stream, the presentation time in seconds of every stored row in the
video's attrs (``times``: stream -> list of seconds; window backbones add ``time_spans``: stream
-> list of ``[start, end]`` seconds of each row's window). A store written before times were
recorded has none: its times are then derived from the recorded frame rate and the frames each
row came from (``frame_indices`` / ``map_frame_indices``, else every frame), frame t at ``t /
fps``, and marked ``derived`` (a constant-rate guess, wrong on variable frame rates).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["StreamTimes", "stream_times"]


@dataclass(frozen=True)
class StreamTimes:
    """Times of one stream's rows: ``seconds [T]`` (a window's centre for window backbones),
    ``spans [T, 2]`` (each window's first and last frame time; None for per-frame rows), and
    ``derived``: True when the store recorded no times and they were computed from fps."""

    seconds: np.ndarray
    derived: bool = False
    spans: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.seconds)


def stream_times(video_id: str, stream: str, attrs: Mapping[str, Any], n_rows: int) -> StreamTimes:
    """The :class:`StreamTimes` of ``stream`` from a video's ``attrs``, which has ``n_rows``
    rows; ValueError naming the video when neither times nor a usable fps are recorded."""
    recorded = (attrs.get("times") or {}).get(stream)
    if recorded is not None:
        seconds = np.asarray(recorded, dtype=np.float64)
        if len(seconds) != n_rows:
            raise ValueError(
                f"video {video_id!r}, stream {stream!r}: {len(seconds)} recorded times for "
                f"{n_rows} rows"
            )
        spans = (attrs.get("time_spans") or {}).get(stream)
        return StreamTimes(
            seconds, False, None if spans is None else np.asarray(spans, dtype=np.float64)
        )
    fps = attrs.get("fps")
    if not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(
            f"video {video_id!r}, stream {stream!r}: no recorded times and no usable fps "
            f"({fps!r}) to derive them from"
        )
    key = "map_frame_indices" if stream.endswith("_map") else "frame_indices"
    frames = attrs.get(key)
    index = np.arange(n_rows) if frames is None else np.asarray(frames, dtype=np.float64)
    if len(index) != n_rows:
        raise ValueError(
            f"video {video_id!r}, stream {stream!r}: {len(index)} {key} for {n_rows} rows"
        )
    log.debug("%s/%s: no recorded times; derived from fps %s", video_id, stream, fps)
    return StreamTimes(np.asarray(index, dtype=np.float64) / float(fps), True)
