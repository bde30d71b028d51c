"""The node cache: pyramid node means (and maxes) of every complete video, built once per store.

Stored under ``/cache/nodes-<stream>/<key>`` (``nodes-<stream>-max/<key>`` with maxes) where the
key hashes what the cache was derived from (the stream, the depth, and every complete video's id,
frame count and extraction time), so adding, removing or re-extracting a video changes the key
and the cache is rebuilt on next use.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from aggregator.nodes import n_nodes, node_maxes, node_means
from storage import FeatureStore

log = logging.getLogger(__name__)

CACHE_DEPTH = 6  # 63 nodes: serves every depth <= 6
_BLOCK = 64  # videos per chunk


@dataclass
class NodeCache:
    """Node means ``[N, M, d]`` (and maxes when built with them) of ``video_ids`` for one stream."""

    stream: str
    depth: int
    video_ids: list[str]
    means: np.ndarray
    maxes: np.ndarray | None
    n_frames: np.ndarray

    def __post_init__(self) -> None:
        self._index = {v: i for i, v in enumerate(self.video_ids)}

    def rows(self, video_ids: list[str]) -> np.ndarray:
        """Row indices of ``video_ids``; a KeyError names the first missing one."""
        try:
            return np.array([self._index[v] for v in video_ids], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(
                f"video {exc.args[0]!r} is not in the {self.stream!r} node cache"
            ) from None

    def take(self, video_ids: list[str], depth: int, kind: str = "mean") -> np.ndarray:
        """``[n, 2^depth - 1, d]`` float32 nodes of ``video_ids`` for a pyramid of ``depth``."""
        if depth > self.depth:
            raise ValueError(f"depth {depth} exceeds the cache depth {self.depth}")
        src = self.means if kind == "mean" else self.maxes
        if src is None:
            raise ValueError(f"the {self.stream!r} node cache was built without {kind!r}")
        return np.asarray(src[self.rows(video_ids), : n_nodes(depth)], dtype=np.float32)


def cache_key(store: FeatureStore, stream: str, depth: int, with_max: bool) -> tuple[str, list]:
    videos = []
    for vid, attrs in store.all_video_attrs(status="complete").items():
        if stream in (attrs.get("streams") or []):
            videos.append((vid, attrs.get("extracted_at"), attrs.get("n_frames")))
    payload = json.dumps(
        {
            "stream": stream,
            "depth": depth,
            "max": with_max,
            "videos": videos,
            "extractor": store.extractor.get(stream),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16], videos


def load_node_cache(
    store: FeatureStore,
    stream: str,
    *,
    depth: int = CACHE_DEPTH,
    with_max: bool = False,
    progress: bool = True,
) -> NodeCache:
    """Return the node cache of ``stream``, building (and storing, when writable) it if stale."""
    key, videos = cache_key(store, stream, depth, with_max)
    if not videos:
        raise ValueError(f"store {store.path!r} has no complete video with stream {stream!r}")
    # means-only and means+maxes caches live side by side (write_cache drops other keys of a name)
    name = f"nodes-{stream}" + ("-max" if with_max else "")
    cached = store.read_cache(name, key)
    ids = [v[0] for v in videos]
    if cached is not None:
        log.info("node cache %s/%s hit (%d videos)", name, key, len(ids))
        return NodeCache(
            stream=stream,
            depth=depth,
            video_ids=ids,
            means=np.asarray(cached["means"][...]),
            maxes=np.asarray(cached["maxes"][...]) if "maxes" in cached else None,
            n_frames=np.asarray(cached["n_frames"][...]),
        )
    m = n_nodes(depth)
    d = store.read(ids[0], stream).shape[1]
    means = np.empty((len(ids), m, d), dtype=np.float16)
    maxes = np.empty((len(ids), m, d), dtype=np.float16) if with_max else None
    n_frames = np.empty(len(ids), dtype=np.int64)
    for i, vid in enumerate(tqdm(ids, desc=f"node cache {stream}", disable=not progress)):
        x = store.read(vid, stream)
        if x.shape[1] != d:
            raise ValueError(
                f"stream {stream!r} of video {vid!r} has d={x.shape[1]}, others have d={d}"
            )
        means[i] = node_means(x, depth)
        if maxes is not None:
            maxes[i] = node_maxes(x, depth)
        n_frames[i] = x.shape[0]
    if store.mode != "r":
        chunks = (min(_BLOCK, len(ids)), m, d)
        shapes = {
            "means": ((len(ids), m, d), "float16", chunks),
            "n_frames": ((len(ids),), "int64", (len(ids),)),
        }
        if maxes is not None:
            shapes["maxes"] = ((len(ids), m, d), "float16", chunks)
        arrays = store.write_cache(name, key, shapes, {"video_ids": ids, "depth": depth})
        arrays["means"][...] = means
        arrays["n_frames"][...] = n_frames
        if maxes is not None:
            arrays["maxes"][...] = maxes
        store.finish_cache(name, key)
        log.info("node cache %s/%s written (%d videos)", name, key, len(ids))
    return NodeCache(stream, depth, ids, means, maxes, n_frames)
