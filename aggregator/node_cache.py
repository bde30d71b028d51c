"""The node cache: pyramid node means (and maxes) of every complete video, built once per store.

Stored under ``/cache/nodes-<stream>/<key>`` (``nodes-<stream>-max/<key>`` with maxes) where the
key hashes what the cache was derived from (the stream, the depth, and every complete video's id,
frame count and extraction time), so adding, removing or re-extracting a video changes the key
and the cache is rebuilt on next use.

Out of core: ``means`` ``[N, M, d]`` float16 is chunked ``(B, 1, d)`` (a block of B videos, one
node, about 1 MiB) without compression (a crc32c per chunk, NaN fill value), so a block of rows and
a range of nodes is read without touching anything else: the ``tp`` head on leaves reads the last
level only. Blocks are small so that a streamed training group (an eighth of the memory budget)
holds whole blocks and reads each block once per epoch: with 4 MiB chunks a group at a small budget
was a piece of a block, and every piece read its block's chunks whole. :func:`load_node_cache` holds
the cache in memory when it fits the memory budget (:func:`aggregator.caches.memory_budget`) and
reads it block by block otherwise; either way it is built in parallel block by block (never whole in
memory) and loaded once per process: the trainer and the similarity index share one
:class:`NodeCache`. :class:`NodeBlocks` serves training batches from an out-of-core cache with
bounded memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from aggregator.caches import BUDGET_ENV as BUDGET_ENV
from aggregator.caches import Summary, build_cache, memory_budget
from aggregator.caches import parse_bytes as parse_bytes
from aggregator.heads.base import NodeInput
from aggregator.intervals import PyramidLeaves, n_nodes, node_maxes, node_means, pyramid_mix
from storage import FeatureStore

log = logging.getLogger(__name__)

CACHE_DEPTH = 6  # 63 nodes: serves every depth <= 6
CHUNK_BYTES = 1 << 20  # about 1 MiB per stored chunk (B videos x one node x d)
_MEMO_SIZE = 4  # node caches kept loaded per process (most recent first out)


def block_rows(d: int) -> int:
    return max(1, CHUNK_BYTES // (2 * d))


class NodeCache:
    """Node means ``[N, M, d]`` (and maxes when built with them) of ``video_ids`` for one stream.

    ``means``/``maxes`` are numpy arrays when the cache is in memory, or stored arrays read block
    by block (:meth:`read`, :meth:`gather`, :meth:`iter_blocks`). :attr:`means` as a numpy array
    is always available for callers that want it whole (:meth:`whole`).
    """

    def __init__(
        self,
        stream: str,
        depth: int,
        video_ids: list[str],
        means: Any,
        maxes: Any,
        n_frames: np.ndarray,
        *,
        rows_per_block: int | None = None,
    ) -> None:
        self.stream = stream
        self.depth = depth
        self.video_ids = video_ids
        self._means = means
        self._maxes = maxes
        self.n_frames = np.asarray(n_frames)
        self.d = int(means.shape[2])
        self.rows_per_block = rows_per_block or block_rows(self.d)
        self._index = {v: i for i, v in enumerate(video_ids)}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def in_memory(self) -> bool:
        return isinstance(self._means, np.ndarray)

    @property
    def has_max(self) -> bool:
        return self._maxes is not None

    def nbytes(self) -> int:
        """Bytes of the cache's node arrays (float16)."""
        n, m, d = self._means.shape
        return 2 * n * m * d * (2 if self._maxes is not None else 1)

    def _src(self, kind: str) -> Any:
        src = self._means if kind == "mean" else self._maxes
        if src is None:
            raise ValueError(f"the {self.stream!r} node cache was built without {kind!r}")
        return src

    def whole(self, kind: str = "mean") -> np.ndarray:
        """The whole ``[N, M, d]`` float16 array in memory (read once, then kept)."""
        src = self._src(kind)
        if isinstance(src, np.ndarray):
            return src
        with self._lock:
            arr = np.asarray(src[...])
            _check_block(arr, self.stream, 0, self.rows_per_block)
            if kind == "mean":
                self._means = arr
            else:
                self._maxes = arr
        return arr

    @property
    def means(self) -> np.ndarray:
        return self.whole("mean")

    @property
    def maxes(self) -> np.ndarray | None:
        return self.whole("max") if self._maxes is not None else None

    def rows(self, video_ids: Sequence[str]) -> np.ndarray:
        """Row indices of ``video_ids``; a KeyError names the first missing one."""
        try:
            return np.array([self._index[v] for v in video_ids], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(
                f"video {exc.args[0]!r} is not in the {self.stream!r} node cache"
            ) from None

    def read(self, start: int, stop: int, nodes: slice, kind: str = "mean") -> np.ndarray:
        """Rows ``start:stop`` and ``nodes`` as float16 ``[stop - start, k, d]``."""
        src = self._src(kind)
        block = np.asarray(src[start:stop, nodes])
        if not isinstance(src, np.ndarray):
            _check_block(block, self.stream, start, self.rows_per_block)
        return block

    def gather(self, rows: np.ndarray, nodes: slice, kind: str = "mean") -> np.ndarray:
        """``[len(rows), k, d]`` float16 of any rows: in memory a plain take; out of core each
        block that holds some of ``rows`` is read once."""
        rows = np.asarray(rows, dtype=np.int64)
        src = self._src(kind)
        if isinstance(src, np.ndarray):
            return np.ascontiguousarray(src[rows, nodes])
        k = len(range(*nodes.indices(src.shape[1])))
        out = np.empty((len(rows), k, self.d), dtype=np.float16)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        blocks = sorted_rows // self.rows_per_block
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        for part in np.split(np.arange(len(rows)), bounds):
            if not len(part):
                continue
            lo, hi = int(sorted_rows[part[0]]), int(sorted_rows[part[-1]]) + 1
            block = self.read(lo, hi, nodes, kind)
            out[order[part]] = block[sorted_rows[part] - lo]
        return out

    def iter_blocks(
        self, nodes: slice = slice(None), kind: str = "mean"
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, [b, k, d] float16)`` block by block, in row order."""
        for start in range(0, len(self), self.rows_per_block):
            yield start, self.read(start, min(start + self.rows_per_block, len(self)), nodes, kind)

    def take(self, video_ids: list[str], depth: int, kind: str = "mean") -> np.ndarray:
        """``[n, 2^depth - 1, d]`` float32 nodes of ``video_ids`` for a pyramid of ``depth``."""
        if depth > self.depth:
            raise ValueError(f"depth {depth} exceeds the cache depth {self.depth}")
        nodes = slice(0, n_nodes(depth))
        return self.gather(self.rows(video_ids), nodes, kind).astype(np.float32)


def _check_block(block: np.ndarray, stream: str, start: int, rows_per_block: int) -> None:
    """A stored cache chunk that went missing reads back as NaN (the fill value) in every one of
    its rows, and a stored node is never NaN, so the first row of every chunk ``block`` (rows
    ``start:``) touches is enough to see it (a full scan of a block costs more than reading it)."""
    if block.dtype.kind != "f" or not len(block):
        return
    first = -(-start // rows_per_block) * rows_per_block  # the first chunk boundary >= start
    probe = np.unique(np.r_[0, np.arange(first, start + len(block), rows_per_block) - start])
    bad = np.isnan(block[probe].reshape(len(probe), -1)).any(1)
    if bad.any():
        row = start + int(probe[np.flatnonzero(bad)[0]])
        raise ValueError(
            f"the {stream!r} node cache is damaged (row {row} reads back as the NaN fill value: "
            "a chunk file is missing); delete the store's /cache folder to rebuild it"
        )


def cache_key(store: FeatureStore, stream: str, depth: int, with_max: bool) -> tuple[str, list]:
    """``(key, [(video_id, extracted_at, n_frames), ...])`` of the complete videos with
    ``stream``, from the store's index."""
    table = store.index_table("complete")
    col = f"T/{stream}"
    if col in table.ints:
        held = np.flatnonzero(table.ints[col] >= 0)
        ids = table.ids[held].tolist()
        times = table.text["extracted_at"][held].tolist()
        frames = table.ints[col][held].tolist()
    else:
        ids, times, frames = [], [], []
    videos = list(zip(ids, times, frames, strict=True))
    h = hashlib.sha256()
    h.update(repr((stream, depth, with_max, store.extractor.get(stream))).encode())
    h.update("\n".join(f"{v}\t{t}\t{n}" for v, t, n in videos).encode())
    return h.hexdigest()[:16], videos


_MEMO: OrderedDict[tuple[str, str, str], NodeCache] = OrderedDict()
_MEMO_LOCK = threading.Lock()


def _memo_key(store: FeatureStore, name: str, key: str) -> tuple[str, str, str]:
    path = store.path if "://" in store.path else os.path.abspath(store.path)
    return path, name, key


def forget_node_caches() -> None:
    """Drop the node caches this process holds (the next load reads them again)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def load_node_cache(
    store: FeatureStore,
    stream: str,
    *,
    depth: int = CACHE_DEPTH,
    with_max: bool = False,
    progress: bool = True,
    budget: int | None = None,
    workers: int | None = None,
) -> NodeCache:
    """Return the node cache of ``stream``, building (and storing, when writable) it if stale.

    In memory when its arrays fit ``budget`` bytes (default :func:`memory_budget`), read block by
    block otherwise. Loaded once per process: later calls with the same store and content return
    the same object (the similarity index reuses the trainer's).
    """
    key, videos = cache_key(store, stream, depth, with_max)
    if not videos:
        raise ValueError(f"store {store.path!r} has no complete video with stream {stream!r}")
    name = f"nodes-{stream}" + ("-max" if with_max else "")
    memo = _memo_key(store, name, key)
    with _MEMO_LOCK:
        if memo in _MEMO:
            _MEMO.move_to_end(memo)
            return _MEMO[memo]
    budget = memory_budget() if budget is None else budget
    ids = [v[0] for v in videos]
    cached = store.read_cache(name, key)
    if cached is not None and cached["attrs"].get("depth") == depth:
        log.info("node cache %s/%s hit (%d videos)", name, key, len(ids))
        means, maxes = cached["means"], cached.get("maxes")
        rows = int(means.chunks[0])
    else:
        means, maxes, rows = _build(
            store, stream, ids, depth, with_max, name, key, progress, budget, workers
        )
    cache = NodeCache(
        stream, depth, ids, means, maxes, _n_frames(cached, videos), rows_per_block=rows
    )
    if not cache.in_memory and cache.nbytes() <= budget:
        cache.whole("mean")
        if cache.has_max:
            cache.whole("max")
    with _MEMO_LOCK:
        _MEMO[memo] = cache
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return cache


def _n_frames(cached: dict[str, Any] | None, videos: list) -> np.ndarray:
    if cached is not None and "n_frames" in cached:
        return np.asarray(cached["n_frames"][...])
    return np.array([v[2] for v in videos], dtype=np.int64)


def _build(
    store: FeatureStore,
    stream: str,
    ids: list[str],
    depth: int,
    with_max: bool,
    name: str,
    key: str,
    progress: bool,
    budget: int,
    workers: int | None,
) -> tuple[Any, Any, int]:
    """The node cache of ``ids`` (see :func:`build_cache`): means (and maxes) of every node."""
    m = n_nodes(depth)
    d = int(store.index_table("complete").ints[f"d/{stream}"].max())
    rows = min(block_rows(d), len(ids))
    summaries: dict[str, Summary] = {"means": (m, lambda x: node_means(x, depth))}
    if with_max:
        summaries["maxes"] = (m, lambda x: node_maxes(x, depth))
    arrays, _ = build_cache(
        store,
        stream,
        ids,
        d,
        summaries,
        name=name,
        key=key,
        attrs={"video_ids": ids, "depth": depth},
        rows=rows,
        node_chunks=True,
        read_dtype=np.float16,
        progress=progress,
        budget=budget,
        workers=workers,
    )
    return arrays["means"], arrays.get("maxes"), rows


# ---------------------------------------------------------------------------------- training
class NodeBlocks:
    """Training data served from out-of-core node caches, a few row blocks at a time.

    The same interface as :class:`aggregator.data.NodeTensors` (``video_ids``, ``labels``,
    ``mix``, ``take``, ``window``, ``batches``), for summaries that are pyramid nodes of the node
    cache: ``nodes[stream]`` is the node range a stream's head reads, and streams in ``leaves``
    get :class:`PyramidLeaves` (mix computed from the frame counts). Memory: two groups of rows (one
    training, one read ahead), an eighth of ``budget`` each (or one cache block, about 1 MiB per
    node read, when that is larger and two still fit half the budget), whatever the number of
    videos.
    """

    def __init__(
        self,
        caches: dict[str, NodeCache],
        nodes: dict[str, slice],
        video_ids: Sequence[str],
        labels: np.ndarray,
        *,
        leaves: dict[str, int] | None = None,
        budget: int | None = None,
    ) -> None:
        if len(labels) != len(video_ids):
            raise ValueError(f"{len(video_ids)} videos but {len(labels)} labels")
        self.caches = caches
        self.node_ranges = nodes
        self.video_ids = list(video_ids)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mix: dict[str, int] = dict(leaves or {})  # stream -> pyramid depth of its leaves
        self.cache_rows = {s: c.rows(self.video_ids) for s, c in caches.items()}
        # rows read at once: two groups are in memory (one training, one read ahead), each held
        # as float16 nodes plus float32 mixes; a group takes an eighth of the budget
        row_bytes = 0
        for s, c in caches.items():
            count = len(range(*nodes[s].indices(n_nodes(c.depth))))
            row_bytes += 2 * count * c.d
            if s in self.mix:
                row_bytes += 4 * n_nodes(self.mix[s]) * count
        budget = memory_budget() if budget is None else budget
        self.group_rows = max(1, budget // 8 // max(1, row_bytes))
        # a group of whole blocks reads each block once; below a block every piece of it reads
        # the block's chunks whole, so groups grow to a block when two of them fit half the budget
        # (blocks of the stream with the most rows per chunk: the others' chunks nest in them)
        self._blocking = max(caches, key=lambda s: caches[s].rows_per_block)
        block = caches[self._blocking].rows_per_block
        if self.group_rows < block and 2 * block * row_bytes <= budget // 2:
            self.group_rows = block

    def __len__(self) -> int:
        return len(self.video_ids)

    def take(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, NodeInput]:
        """Rows ``index`` of every stream (float16 unless ``dtype``)."""
        rows = np.asarray(torch.as_tensor(index).cpu().numpy(), dtype=np.int64)
        out: dict[str, NodeInput] = {}
        for s, cache in self.caches.items():
            cr = self.cache_rows[s][rows]
            t = torch.from_numpy(cache.gather(cr, self.node_ranges[s]))
            t = t if dtype is None else t.to(dtype)
            if s in self.mix:
                depth = self.mix[s]
                mix = np.stack([pyramid_mix(int(f), depth) for f in cache.n_frames[cr]])
                m = torch.from_numpy(mix.astype(np.float32))
                out[s] = PyramidLeaves(t, m if dtype is None else m.to(dtype))
            else:
                out[s] = t
        return out

    def window(
        self, start: int, stop: int, dtype: torch.dtype | None = None
    ) -> dict[str, NodeInput]:
        return self.take(torch.arange(start, stop), dtype)

    def _plan(
        self, index: np.ndarray, batch_size: int, shuffle: bool, generator: torch.Generator | None
    ) -> list[np.ndarray]:
        """Groups of rows to read together (at most ``group_rows`` each, at least a batch): in
        index order (whole blocks to a group when the index is in cache order), or, shuffled,
        the rows of random blocks (a block whole when it fits a group, else in random pieces),
        several blocks or pieces to a group, in random order within the group."""
        per = max(batch_size, self.group_rows)
        cache = self.caches[self._blocking]
        cache_rows = self.cache_rows[self._blocking][index]
        if not shuffle:
            if len(index) > 1 and bool((np.diff(cache_rows) >= 0).all()):
                return self._store_plan(index, cache_rows // cache.rows_per_block, per)
            return [index[i : i + per] for i in range(0, len(index), per)]
        order = np.argsort(cache_rows, kind="stable")
        blocks = cache_rows[order] // cache.rows_per_block
        pieces: list[np.ndarray] = []
        for part in np.split(order, np.flatnonzero(np.diff(blocks)) + 1):
            rows = index[part]
            rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
            pieces.extend(rows[i : i + per] for i in range(0, len(rows), per))
        picked = torch.randperm(len(pieces), generator=generator).tolist()
        groups: list[np.ndarray] = []
        current: list[np.ndarray] = []
        size = 0
        for k in picked:  # several small pieces share a group, up to its size
            if current and size + len(pieces[k]) > per:
                groups.append(np.concatenate(current))
                current, size = [], 0
            current.append(pieces[k])
            size += len(pieces[k])
        if current:
            groups.append(np.concatenate(current))
        return [g[torch.randperm(len(g), generator=generator).numpy()] for g in groups]

    @staticmethod
    def _store_plan(index: np.ndarray, blocks: np.ndarray, per: int) -> list[np.ndarray]:
        """Groups of ``index`` (in cache order, ``blocks`` its rows' blocks) that never split a
        block across two groups when a group holds a whole block: consecutive blocks (or pieces
        of a block larger than a group) packed up to ``per`` rows, so each block is read once."""
        groups: list[np.ndarray] = []
        current: list[np.ndarray] = []
        size = 0
        for part in np.split(index, np.flatnonzero(np.diff(blocks)) + 1):
            for i in range(0, len(part), per):
                piece = part[i : i + per]
                if current and size + len(piece) > per:
                    groups.append(np.concatenate(current))
                    current, size = [], 0
                current.append(piece)
                size += len(piece)
        if current:
            groups.append(np.concatenate(current))
        return groups

    def store_order(self, index: np.ndarray | torch.Tensor) -> np.ndarray:
        """The permutation of ``index`` that puts its rows in node-cache order. A pass that needs
        no order (statistics, scoring, embeddings) over it reads each block once; over a random
        order every group of rows reads most of the blocks."""
        idx = np.asarray(torch.as_tensor(index).cpu().numpy(), dtype=np.int64)
        return np.argsort(self.cache_rows[self._blocking][idx], kind="stable")

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

        Without ``shuffle``/``windows`` the batches follow ``index``'s order (as
        ``NodeTensors.batches``); with either, every row comes once per epoch, in an order that
        reads each block once: random blocks (or pieces of them), shuffled within a group. The
        next group of rows is read in the background while the current one trains.
        """
        idx = np.asarray(torch.as_tensor(index).cpu().numpy(), dtype=np.int64)
        if len(idx) == 0:
            return
        groups = self._plan(idx, batch_size, shuffle or windows, generator)
        carry_rows = np.zeros(0, dtype=np.int64)
        carry: dict[str, NodeInput] = {}
        with ThreadPoolExecutor(1) as pool:
            ahead: Future[dict[str, NodeInput]] = pool.submit(self._fetch, groups[0])
            for g, rows in enumerate(groups):
                got = ahead.result()
                if g + 1 < len(groups):
                    ahead = pool.submit(self._fetch, groups[g + 1])
                a = 0
                if len(carry_rows):  # the rows left over from the last group start this one
                    a = min(batch_size - len(carry_rows), len(rows))
                    carry = _cat(carry, _slice(got, 0, a))
                    carry_rows = np.concatenate([carry_rows, rows[:a]])
                    if len(carry_rows) == batch_size:
                        yield self._place(carry, carry_rows, dtype, device)
                        carry_rows, carry = np.zeros(0, dtype=np.int64), {}
                last = g + 1 == len(groups)
                while a < len(rows):
                    b = min(a + batch_size, len(rows))
                    if b - a < batch_size and not last:
                        carry_rows, carry = rows[a:b], _slice(got, a, b)
                        break
                    yield self._place(_slice(got, a, b), rows[a:b], dtype, device)
                    a = b
                del got
            if len(carry_rows):
                yield self._place(carry, carry_rows, dtype, device)

    def _fetch(self, rows: np.ndarray) -> dict[str, NodeInput]:
        return self.take(torch.from_numpy(rows), None)

    def _place(
        self,
        nodes: dict[str, NodeInput],
        rows: np.ndarray,
        dtype: torch.dtype | None,
        device: torch.device | str,
    ) -> tuple[dict[str, NodeInput], torch.Tensor, torch.Tensor]:
        out: dict[str, NodeInput] = {}
        for s, v in nodes.items():
            if isinstance(v, PyramidLeaves):
                leaves = v.leaves if dtype is None else v.leaves.to(dtype)
                mix = v.mix if dtype is None else v.mix.to(dtype)
                out[s] = PyramidLeaves(leaves.contiguous(), mix.contiguous())
            else:
                out[s] = (v if dtype is None else v.to(dtype)).contiguous()
            if torch.device(device).type != "cpu":
                out[s] = out[s].to(device)
        r = torch.from_numpy(rows)
        return out, self.labels[r].to(device), r


def _slice(nodes: dict[str, NodeInput], a: int, b: int) -> dict[str, NodeInput]:
    return {
        s: PyramidLeaves(v.leaves[a:b], v.mix[a:b]) if isinstance(v, PyramidLeaves) else v[a:b]
        for s, v in nodes.items()
    }


def _cat(x: dict[str, NodeInput], y: dict[str, NodeInput]) -> dict[str, NodeInput]:
    out: dict[str, NodeInput] = {}
    for s in x:
        a, b = x[s], y[s]
        if isinstance(a, PyramidLeaves) and isinstance(b, PyramidLeaves):
            out[s] = PyramidLeaves(torch.cat([a.leaves, b.leaves]), torch.cat([a.mix, b.mix]))
        else:
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            out[s] = torch.cat([a, b])
    return out
