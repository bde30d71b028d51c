"""Spatial maps for a served ``stpn`` run: the recorded map configuration, rebuilt and checked,
and one upload's maps computed in the same forward pass as its feature vectors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from extractor.features import MAP_STREAMS, ExtractedVideo, FeatureExtractor
from extractor.prepare import FrameChunk, VideoDone, prepare_video


def map_configs(config: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The map streams' entries of a recorded extractor configuration."""
    return {s: c for s, c in config.items() if s in MAP_STREAMS}


def extractor_from_config(
    config: Mapping[str, Mapping[str, Any]], *, device: str = "cpu"
) -> FeatureExtractor:
    """:meth:`FeatureExtractor.from_config` plus the recorded map streams, checked to be identical
    (same source backbone, projection, stride)."""
    extractor = FeatureExtractor.from_config(config, device=device)
    maps = map_configs(config)
    if not maps:
        return extractor
    options = {
        (
            int(c["frame_stride"]),
            (c.get("projection") or {}).get("out_channels"),
            int((c.get("projection") or {}).get("seed", 0)),
        )
        for c in maps.values()
    }
    if len(options) != 1:
        raise ValueError(f"recorded map streams differ in stride or projection: {dict(maps)}")
    stride, dim, seed = options.pop()
    extractor.set_maps(
        tuple(s for s in MAP_STREAMS if s in maps), dim=dim, stride=stride, seed=seed
    )
    rebuilt = extractor.config()
    for name, recorded in maps.items():
        keys = set(recorded) | set(rebuilt[name])
        diff = sorted(k for k in keys if recorded.get(k) != rebuilt[name].get(k))
        if diff:
            raise ValueError(f"the {name} stream rebuilt from its record differs in {diff}")
    return extractor


def extract_with_maps(
    extractor: FeatureExtractor,
    path: str | Path,
    *,
    stride: int = 1,
    max_frames: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ExtractedVideo:
    """:meth:`FeatureExtractor.extract_file` that also returns the extractor's map streams.

    ``features`` holds the vector streams ``[n, d]`` and the map streams ``[n', h, w, C]`` of
    every ``extractor.map_stride``-th kept frame from the first, as ``framepool extract`` stores
    them, from the same forward passes.
    """
    flow = extractor.flow.clone() if extractor.flow is not None else None
    streams = extractor.streams
    parts: dict[str, list[np.ndarray]] = {s: [] for s in (*streams, *extractor.map_streams)}
    pending: list[FrameChunk] = []
    done: VideoDone | None = None
    embedded = 0  # rows embedded so far

    def run_pending() -> None:
        nonlocal embedded
        if not pending:
            return
        batch = {s: np.concatenate([getattr(c, s) for c in pending]) for s in streams}
        n = len(next(iter(batch.values())))
        rows = np.flatnonzero((embedded + np.arange(n)) % extractor.map_stride == 0)
        feats, maps = extractor.embed_with_maps(batch, rows)
        for s, f in (*feats.items(), *maps.items()):
            parts[s].append(f)
        embedded += n
        pending.clear()

    for item in prepare_video(
        path,
        streams=streams,
        flow=flow,
        stride=stride,
        max_frames=max_frames,
        should_stop=should_stop,
        appearance_input=extractor.appearance_input,
    ):
        if isinstance(item, VideoDone):
            done = item
            break
        pending.append(item)
        if sum(len(c) for c in pending) >= extractor.batch_size:
            run_pending()
    if done is None:
        raise InterruptedError(f"{str(path)!r}: extraction stopped before the end")
    run_pending()
    features = {s: np.concatenate(p) for s, p in parts.items()}
    return ExtractedVideo(
        features=features,
        n_frames=done.n_frames,
        frame_indices=done.frame_indices,
        fps=done.fps,
        width=done.width,
        height=done.height,
        codec=done.codec,
    )
