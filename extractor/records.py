"""What every extraction engine records the same way: the run's summary, a video's metadata and
times, writing a finished video (keeping the streams a rerun does not replace), recording a failure,
and which sources are left to do.

The local pipeline (:mod:`extractor.local_engine`), the Ray engine (:mod:`extractor.ray_engine`)
and the window backbones (:mod:`extractor.windows`) all build on these, so that a video reads back
the same from any of them; none of them imports another.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from extractor.prepare import VideoDone
from extractor.sharding import in_shard
from extractor.sources import Source
from storage import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class ExtractionSummary:
    """What one run did. ``complete``: extracted now; ``skipped``: complete before the run."""

    store: str
    complete: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # video id -> reason
    outside_shard: int = 0
    frames: int = 0  # frames of the videos completed in this run
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{len(self.complete)} extracted ({self.frames} frames, {rate:.1f} frames/s, "
            f"{self.seconds:.1f} s), {len(self.skipped)} already complete, "
            f"{len(self.failed)} failed"
            + (f", {self.outside_shard} in other shards" if self.outside_shard else "")
            + f" -> {self.store}"
        ]
        lines.extend(f"  failed {vid}: {reason}" for vid, reason in sorted(self.failed.items()))
        return "\n".join(lines)


def video_meta(source: Source, done: VideoDone, sha256: str, subsampled: bool) -> dict[str, Any]:
    """The attrs a finished video's group records about its file: source, hash, frame count,
    rate, size and codec, and its kept frames when ``subsampled``."""
    meta: dict[str, Any] = {
        "source": str(source.path),
        "source_sha256": sha256,
        "n_frames": done.n_frames,
        "fps": done.fps,
        "width": done.width,
        "height": done.height,
        "codec": done.codec,
    }
    if subsampled:
        meta["frame_indices"] = done.frame_indices.tolist()
    if done.times_estimated:
        meta["times_estimated"] = done.times_estimated
    return meta


def stream_times(done: VideoDone, streams: Sequence[str]) -> dict[str, list[float]]:
    """Per stream the presentation time of every stored row (the kept frames')."""
    if done.frame_times is None:
        return {}
    times = done.frame_times.tolist()
    return {s: times for s in streams}


def _keep_times(meta: dict[str, Any], name: str) -> None:
    """A kept stream has the rows of the streams written with it: the same times."""
    times = meta.get("times")
    if times and name not in times:
        times[name] = next(iter(times.values()))


def store_video(
    store: FeatureStore,
    source: Source,
    streams: dict[str, np.ndarray],
    meta: dict[str, Any],
    n: int,
) -> None:
    """Write one finished video (``n`` kept frames) and mark it complete; a video already
    complete with other streams keeps them (its streams of the same length, its maps)."""
    vid = source.video_id
    if store.status(vid) == "complete":  # adding streams: keep the others
        for name in store.streams(vid):
            if name not in streams and store.n_frames(vid, name) == n:
                streams[name] = store.read(vid, name, dtype=np.float16)
                _keep_times(meta, name)
        _keep_maps(store, vid, streams, meta)
    store.write_video(
        vid, streams, label=source.label, split=source.split, group=source.group, meta=meta
    )


def record_failure(store: FeatureStore, source: Source, reason: str) -> None:
    """Mark ``source`` failed with ``reason`` (logged, never raised, when even that fails)."""
    try:
        store.mark_failed(
            source.video_id,
            reason,
            label=source.label,
            split=source.split,
            group=source.group,
            meta={"source": str(source.path)},
        )
    except Exception:
        log.exception("could not record the failure of %s", source.video_id)


def _keep_maps(
    store: FeatureStore, vid: str, streams: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Carry a complete video's map streams (and their frame indices) into its rewrite when the
    new write does not replace them: their frames are recorded, not tied to the new T."""
    if "map_frame_indices" in meta:
        return
    old = store.video_attrs(vid)
    kept = [
        name
        for name in store.streams(vid)
        if name.endswith("_map") and name not in streams and "map_frame_indices" in old
    ]
    for name in kept:
        streams[name] = store.read(vid, name, dtype=np.float16)
    if kept:
        meta["map_frame_indices"] = old["map_frame_indices"]
        meta["map_stride"] = old.get("map_stride")


def todo_sources(
    store: FeatureStore,
    sources: Sequence[Source],
    streams: Sequence[str],
    shard: tuple[int, int] | None,
    summary: ExtractionSummary,
) -> list[Source]:
    """The ``sources`` this run does: those of ``shard`` not already complete with every one of
    ``streams``; the others are counted in ``summary`` (outside the shard, or skipped)."""
    todo = []
    for src in sources:
        if not in_shard(src.video_id, shard):
            summary.outside_shard += 1
            continue
        if store.status(src.video_id) == "complete" and set(streams) <= set(
            store.streams(src.video_id)
        ):
            summary.skipped.append(src.video_id)
            continue
        todo.append(src)
    return todo
