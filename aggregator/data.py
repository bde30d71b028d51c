"""Training data over a FeatureStore.

Two ways in, one per kind of head:

- node-only heads read fixed-size interval summaries (pyramid nodes, DTPP bins, DATP segments),
  held as one in-memory tensor ``[n, M, d]`` per stream (:class:`NodeTensors`) and batched by
  plain indexing, with no DataLoader in the loop. Pyramid nodes come from the store's node cache
  (:func:`aggregator.node_cache.load_node_cache`, built once per store, reused afterwards); other
  partitions from an interval cache kept the same way (:func:`load_interval_cache`).
- heads that need frames read padded batches ``[B, T, d]`` + lengths + mask through a DataLoader
  (:class:`FrameDataset`, :func:`pad_collate`, :func:`frame_loader`).

Labels become class indices through ``store.class_names`` (:mod:`aggregator.splits`, with the
splits and validation parts). Any feature size, one or more streams.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aggregator.caches import build_cache, memory_budget
from aggregator.heads.base import NodeInput
from aggregator.intervals import (
    Intervals,
    PyramidLeaves,
    leaf_nodes,
    n_nodes,
    pool_intervals,
    pyramid_mix,
)
from aggregator.node_cache import CACHE_DEPTH, NodeBlocks, cache_key, load_node_cache
from aggregator.splits import (
    grouped_holdout,
    label_indices,
    split_videos,
    stratified_holdout,
    video_groups,
)
from storage import FeatureStore

log = logging.getLogger(__name__)

__all__ = [  # the labels and splits (aggregator.splits) are importable from here too
    "FrameBatch",
    "FrameDataset",
    "NodeTensors",
    "frame_loader",
    "grouped_holdout",
    "label_indices",
    "load_interval_cache",
    "load_node_data",
    "load_node_tensors",
    "load_pyramid_leaves",
    "load_summaries",
    "open_store",
    "pad_collate",
    "pad_streams",
    "split_videos",
    "stratified_holdout",
    "summaries_of",
    "video_groups",
]

_BLOCK = 64  # videos per chunk of a stored interval cache


def open_store(path: str, *, writable: bool = True) -> FeatureStore:
    """Open a store for training: writable when possible (to keep the caches it builds)."""
    if writable:
        try:
            return FeatureStore.open(path, "r+")
        except PermissionError:
            log.info("store %s is not writable; caches will be built in memory", path)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            log.info("store %s is not writable (%s); caches will be built in memory", path, exc)
    return FeatureStore.open(path, "r")


# ---------------------------------------------------------------------------------- node tensors
def _cache_name(stream: str, spec: Intervals) -> str:
    return f"intervals-{stream}-{spec.kind}-" + "-".join(str(p) for p in spec.parts)


def load_interval_cache(
    store: FeatureStore, stream: str, spec: Intervals, *, progress: bool = True
) -> tuple[list[str], np.ndarray]:
    """``(video_ids, [N, M, d] float16)`` summaries of every complete video with ``stream``.

    Like the node cache, stored under ``/cache/intervals-<stream>-<kind>-<parts>/<key>`` with a key
    that hashes the videos it was derived from, so it is rebuilt when a video is added, removed or
    re-extracted; built in memory when the store is read-only.
    """
    base, videos = cache_key(store, stream, 0, spec.kind == "max")
    if not videos:
        raise ValueError(f"store {store.path!r} has no complete video with stream {stream!r}")
    payload = json.dumps({"videos": base, **spec.to_dict()}, sort_keys=True)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    name = _cache_name(stream, spec)
    ids = [v[0] for v in videos]
    cached = store.read_cache(name, key)
    if cached is not None:
        log.info("interval cache %s/%s hit (%d videos)", name, key, len(ids))
        return ids, np.asarray(cached["values"][...])
    d = int(store.read(ids[0], stream).shape[1])
    arrays, _ = build_cache(
        store,
        stream,
        ids,
        d,
        {"values": (spec.count, lambda x: pool_intervals(x, spec))},
        name=name,
        key=key,
        attrs={"video_ids": ids, **spec.to_dict()},
        rows=min(_BLOCK, len(ids)),
        node_chunks=False,
        read_dtype=np.float32,
        progress=progress,
        budget=1 << 62,  # the summaries are returned whole in memory either way
    )
    values = np.asarray(arrays["values"][...])
    return ids, values


def load_summaries(
    store: FeatureStore,
    video_ids: Sequence[str],
    stream: str,
    spec: Intervals,
    *,
    progress: bool = True,
) -> np.ndarray:
    """``[n, M, d]`` float16 summaries of ``video_ids`` for one stream, from the store's caches.

    Pyramid-node partitions (power-of-two part counts up to the cache depth) come from the node
    cache; anything else from the interval cache.
    """
    idx = spec.node_indices()
    if idx is not None and max(idx) < n_nodes(CACHE_DEPTH):
        cache = load_node_cache(store, stream, with_max=spec.kind == "max", progress=progress)
        src = cache.means if spec.kind == "mean" else cache.maxes
        assert src is not None
        rows = cache.rows(list(video_ids))
    else:
        ids, src = load_interval_cache(store, stream, spec, progress=progress)
        position = {v: i for i, v in enumerate(ids)}
        missing = [v for v in video_ids if v not in position]
        if missing:
            raise KeyError(f"video {missing[0]!r} is not in the {stream!r} interval cache")
        rows = np.array([position[v] for v in video_ids], dtype=np.int64)
        idx = list(range(spec.count))
    whole_rows = len(rows) == src.shape[0] and bool((rows == np.arange(len(rows))).all())
    if whole_rows and idx == list(range(src.shape[1])):
        return np.ascontiguousarray(src, dtype=np.float16)  # no copy when it is the whole cache
    return np.ascontiguousarray(src[np.ix_(rows, np.asarray(idx))], dtype=np.float16)


def load_pyramid_leaves(
    store: FeatureStore,
    video_ids: Sequence[str],
    stream: str,
    depth: int,
    *,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(leaves [n, 2^(D-1), d] float16, n_frames [n])`` from the node cache: the last pyramid
    level, from which :func:`aggregator.intervals.pyramid_mix` rebuilds every node."""
    if not 1 <= depth <= CACHE_DEPTH:
        raise ValueError(f"leaves come from the node cache: depth must be 1..{CACHE_DEPTH}")
    cache = load_node_cache(store, stream, progress=progress)
    rows = cache.rows(list(video_ids))
    leaves = np.ascontiguousarray(cache.means[rows, leaf_nodes(depth)], dtype=np.float16)
    return leaves, np.asarray(cache.n_frames)[rows]


@dataclass
class NodeTensors:
    """In-memory summaries of ``video_ids``: ``nodes[stream] [n, M_s, d_s]`` and ``labels [n]``.

    A stream with an entry in ``mix`` holds pyramid leaves ``[n, L, d]`` in ``nodes`` and their
    mixing ``[n, M, L]`` in ``mix``; :meth:`take` hands it out as :class:`PyramidLeaves`.
    """

    video_ids: list[str]
    nodes: dict[str, torch.Tensor]
    labels: torch.Tensor
    mix: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.video_ids)

    def take(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, NodeInput]:
        """Rows ``index`` of every stream, converted to ``dtype`` (contiguous)."""
        out: dict[str, NodeInput] = {}
        for s, t in self.nodes.items():
            rows = t.index_select(0, index)
            rows = rows if dtype is None or rows.dtype == dtype else rows.to(dtype)
            if s in self.mix:
                mix = self.mix[s].index_select(0, index)
                out[s] = PyramidLeaves(rows, mix if dtype is None else mix.to(dtype))
            else:
                out[s] = rows
        return out

    def window(
        self, start: int, stop: int, dtype: torch.dtype | None = None
    ) -> dict[str, NodeInput]:
        """Rows ``start:stop`` of every stream as views (no copy unless ``dtype`` converts)."""
        out: dict[str, NodeInput] = {}
        for s, t in self.nodes.items():
            rows = t[start:stop]
            rows = rows if dtype is None or rows.dtype == dtype else rows.to(dtype)
            if s in self.mix:
                mix = self.mix[s][start:stop]
                out[s] = PyramidLeaves(rows, mix if dtype is None else mix.to(dtype))
            else:
                out[s] = rows
        return out

    def batches(
        self,
        index: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        windows: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[dict[str, NodeInput], torch.Tensor, torch.Tensor]]:
        """``(nodes {stream: [b, M, d]}, labels [b], rows [b])`` over the rows ``index``.

        ``shuffle`` draws a new order of the rows. ``windows`` (rows stored in random order, so
        ``index`` must be a contiguous range) instead cuts the range at a random offset into
        windows of ``batch_size`` rows taken as views, in random order, and gathers the few rows
        left at both ends: the batches change from epoch to epoch without copying the node
        tensors (a gather of every batch was a sixth of a CPU training step).
        """
        index = torch.as_tensor(index, dtype=torch.long)
        if windows:
            yield from self._windows(index, batch_size, generator, dtype, device)
            return
        if shuffle:
            index = index[torch.randperm(len(index), generator=generator)]
        for start in range(0, len(index), batch_size):
            rows = index[start : start + batch_size]
            yield self._place(self.take(rows, dtype), rows, device)

    def _place(
        self, nodes: dict[str, NodeInput], rows: torch.Tensor, device: torch.device | str
    ) -> tuple[dict[str, NodeInput], torch.Tensor, torch.Tensor]:
        if torch.device(device).type != "cpu":
            nodes = {s: t.to(device) for s, t in nodes.items()}
        return nodes, self.labels[rows].to(device), rows

    def _windows(
        self,
        index: torch.Tensor,
        batch_size: int,
        generator: torch.Generator | None,
        dtype: torch.dtype | None,
        device: torch.device | str,
    ) -> Iterator[tuple[dict[str, NodeInput], torch.Tensor, torch.Tensor]]:
        n = len(index)
        if n == 0:
            return
        first = int(index[0])
        if not torch.equal(index, torch.arange(first, first + n)):
            raise ValueError("windowed batches need a contiguous range of rows")
        offset = int(torch.randint(min(batch_size, n), (1,), generator=generator))
        n_windows = (n - offset) // batch_size
        # ("w", start) is a window of rows; ("g", rows) gathers the ends left over
        plan: list[tuple[str, Any]] = [
            ("w", first + offset + k * batch_size) for k in range(n_windows)
        ]
        ends = torch.cat([index[:offset], index[offset + n_windows * batch_size :]])
        plan += [("g", ends[i : i + batch_size]) for i in range(0, len(ends), batch_size)]
        for k in torch.randperm(len(plan), generator=generator).tolist():
            kind, what = plan[k]
            if kind == "w":
                rows = torch.arange(what, what + batch_size)
                yield self._place(self.window(what, what + batch_size, dtype), rows, device)
            else:
                yield self._place(self.take(what, dtype), what, device)


def _as_leaves(stream: str, spec: Intervals, leaves: Collection[str]) -> bool:
    """Whether ``stream`` is held as pyramid leaves: asked for, and its spec is a whole pyramid
    of means that the node cache holds."""
    depth = len(spec.parts)
    return stream in leaves and depth <= CACHE_DEPTH and spec == Intervals.pyramid(depth)


def load_node_tensors(
    store: FeatureStore,
    video_ids: Sequence[str],
    labels: np.ndarray,
    specs: Mapping[str, Intervals],
    *,
    dtype: torch.dtype = torch.float32,
    leaves: Collection[str] = (),
    progress: bool = True,
) -> NodeTensors:
    """Summaries of ``video_ids`` for every stream of ``specs`` (stream -> what its head reads).

    Streams in ``leaves`` whose spec is a full pyramid of means are held as pyramid leaves and
    their mixing (half the memory; for heads that take :class:`PyramidLeaves`).
    """
    if len(labels) != len(video_ids):
        raise ValueError(f"{len(video_ids)} videos but {len(labels)} labels")
    nodes, mixes = {}, {}
    for stream, spec in specs.items():
        if _as_leaves(stream, spec, leaves):
            depth = len(spec.parts)
            arr, n_frames = load_pyramid_leaves(store, video_ids, stream, depth, progress=progress)
            mix = np.stack([pyramid_mix(int(t), depth) for t in n_frames]).astype(np.float32)
            mixes[stream] = torch.from_numpy(mix)
        else:
            arr = load_summaries(store, video_ids, stream, spec, progress=progress)
        nodes[stream] = torch.from_numpy(arr).to(dtype).contiguous()
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    return NodeTensors(list(video_ids), nodes, labels_t, mixes)


def load_node_data(
    store: FeatureStore,
    video_ids: Sequence[str],
    labels: np.ndarray,
    specs: Mapping[str, Intervals],
    *,
    dtype: torch.dtype = torch.float32,
    leaves: Collection[str] = (),
    progress: bool = True,
    budget: int | None = None,
) -> NodeTensors | NodeBlocks:
    """:func:`load_node_tensors` when the summaries fit ``budget`` bytes (default
    :func:`aggregator.caches.memory_budget`), else :class:`NodeBlocks` streaming row blocks
    of the node cache (pyramid nodes only), so that memory stays bounded at any store size."""
    budget = memory_budget() if budget is None else budget
    size = torch.tensor([], dtype=dtype).element_size()
    ranges: dict[str, slice] = {}
    depths: dict[str, int] = {}
    need = 0
    dims = store.index_table("complete").ints
    for stream, spec in specs.items():
        depth = len(spec.parts)
        idx = spec.node_indices()
        if spec.kind != "mean" or idx is None or max(idx) >= n_nodes(CACHE_DEPTH):
            ranges = {}
            break
        if _as_leaves(stream, spec, leaves):
            ranges[stream], depths[stream] = leaf_nodes(depth), depth
        elif list(idx) == list(range(idx[0], idx[-1] + 1)):
            ranges[stream] = slice(idx[0], idx[-1] + 1)
        else:
            ranges = {}
            break
        count = len(range(*ranges[stream].indices(n_nodes(CACHE_DEPTH))))
        need += len(video_ids) * count * int(dims.get(f"d/{stream}", np.zeros(1)).max()) * size
    # in memory: the held tensors, plus the float16 cache they came from
    if len(ranges) < len(specs) or need * 3 // 2 <= budget:
        return load_node_tensors(
            store, video_ids, labels, specs, dtype=dtype, leaves=leaves, progress=progress
        )
    caches = {s: load_node_cache(store, s, progress=progress, budget=budget // 2) for s in ranges}
    log.info("node data (%.1f GiB) exceeds the memory budget: streaming row blocks", need / 2**30)
    return NodeBlocks(caches, ranges, video_ids, labels, leaves=depths, budget=budget)


def summaries_of(
    features: Mapping[str, np.ndarray], specs: Mapping[str, Intervals]
) -> dict[str, torch.Tensor]:
    """``{stream: [1, M, d]}`` float32 summaries of one video's frames ``{stream: [T, d]}``."""
    out = {}
    for stream, spec in specs.items():
        if stream not in features:
            raise KeyError(f"features lack stream {stream!r}; given {sorted(features)}")
        x = np.asarray(features[stream])
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"stream {stream!r}: expected features [T, d], got shape {x.shape}")
        out[stream] = torch.from_numpy(pool_intervals(x, spec))[None]
    return out


# ---------------------------------------------------------------------------------- padded frames
class FrameDataset(Dataset[dict[str, Any]]):
    """One item per video: ``{"features": {stream: [T, d] float32}, "label": int, "video_id"}``."""

    def __init__(
        self,
        store: FeatureStore,
        video_ids: Sequence[str],
        streams: Sequence[str],
        labels: np.ndarray | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(video_ids):
            raise ValueError(f"{len(video_ids)} videos but {len(labels)} labels")
        self.store = store
        self.video_ids = list(video_ids)
        self.streams = list(streams)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vid = self.video_ids[i]
        feats = {s: torch.from_numpy(self.store.read(vid, s)) for s in self.streams}
        return {
            "features": feats,
            "label": -1 if self.labels is None else int(self.labels[i]),
            "video_id": vid,
        }

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items (the DataLoader's batched fetch), read with a thread pool."""
        ids = [self.video_ids[i] for i in indices]
        feats = {s: self.store.read_many(ids, s) for s in self.streams}
        return [
            {
                "features": {s: torch.from_numpy(feats[s][k]) for s in self.streams},
                "label": -1 if self.labels is None else int(self.labels[i]),
                "video_id": ids[k],
            }
            for k, i in enumerate(indices)
        ]


@dataclass
class FrameBatch:
    """Padded frames ``{stream: [B, T, ...]}``, ``lengths [B]``, ``mask [B, T]`` (True: a frame).

    Frame vectors give ``[B, T, d]``; spatial maps (:mod:`aggregator.maps.data`) give
    ``[B, T, h, w, C]``.
    """

    features: dict[str, torch.Tensor]
    lengths: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    video_ids: list[str]


def pad_streams(
    items: Sequence[Mapping[str, Any]], dtype: torch.dtype = torch.float32
) -> FrameBatch:
    """Stack videos of different lengths into one zero-padded batch of ``dtype``.

    Every item is ``{"features": {stream: [T_i, ...]}, "label": int, "video_id": str}``; a stream
    has the same trailing shape in every item, and all of an item's streams have T_i frames.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    streams = list(items[0]["features"])
    lengths = torch.tensor([int(next(iter(it["features"].values())).shape[0]) for it in items])
    t_max = int(lengths.max())
    features = {}
    for s in streams:
        shape = tuple(items[0]["features"][s].shape[1:])
        out = torch.zeros(len(items), t_max, *shape, dtype=dtype)
        for i, it in enumerate(items):
            x = it["features"][s]
            if x.shape[0] != lengths[i] or tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"video {it['video_id']!r}: stream {s!r} is {tuple(x.shape)}, expected "
                    f"[{int(lengths[i])}, {', '.join(map(str, shape))}]"
                )
            out[i, : x.shape[0]] = x
        features[s] = out
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    labels = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    return FrameBatch(features, lengths, mask, labels, [str(it["video_id"]) for it in items])


def pad_collate(items: Sequence[Mapping[str, Any]]) -> FrameBatch:
    """Frame vectors ``[T_i, d]`` of videos of different lengths as one float32 batch."""
    return pad_streams(items, torch.float32)


def frame_loader(
    store: FeatureStore,
    video_ids: Sequence[str],
    streams: Sequence[str],
    labels: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader[dict[str, Any]]:
    """A DataLoader of :class:`FrameBatch` es over the videos (seeded shuffling)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        FrameDataset(store, video_ids, streams, labels),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=num_workers,
        collate_fn=pad_collate,
    )
