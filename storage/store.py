"""The Zarr v3 feature store: one group per video, one float16 array per stream.

Layout (the contract other parts rely on)::

    /                          attrs: schema_version, created_by, extractor, class_names (those
                                  given at creation; see :attr:`FeatureStore.class_names` and
                                  :attr:`FeatureStore.extractor`)
    /videos/<video_id>/<stream>   float16 [T, d]
    /videos/<video_id>            attrs: label, split, source, source_sha256, n_frames, fps,
                                  width, height, status, error, extracted_at, times (stream ->
                                  seconds of every row; see :mod:`storage.times`)
    /splits                       attrs: named split lists of older stores (read, never written)
    /index/...                    the metadata index of every video (:mod:`storage.index`), and
                                  the declarations of streams, split lists and class names that
                                  writers add (:mod:`storage.declarations`), merged on read
    /cache/<name>/<key>/...       derived data, keyed by a hash of its inputs

A video is marked ``complete`` only after every one of its streams is written, in one metadata
write with its ``error`` and ``extracted_at``; until then its status is ``incomplete`` (or the
group is absent), so a crash never leaves a half-written video that looks finished.

Listing, labels, splits, class names and :meth:`FeatureStore.info` read only the index; a video's
groups stay plain Zarr (any Zarr v3 reader can open them), and the index is rebuilt from them by
:meth:`FeatureStore.reindex` (``framepool store reindex``), or on open for the videos it misses.
Stream arrays use the layout of :mod:`storage.layout` (NaN fill value, per-chunk crc32c), so that
damage raises :class:`CorruptVideoError` instead of reading back as zeros. The index view, root
group, cache, summary and damage check are in their own modules (:mod:`storage.index_view`,
:mod:`storage.root`, :mod:`storage.cache`, :mod:`storage.summary`, :mod:`storage.verify`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from storage.cache import finish_cache, read_cache, write_cache
from storage.declarations import (
    SPLITS,
    declare,
    declare_streams,
    merged_extractor,
    merged_splits,
    new_streams,
)
from storage.files import files_for
from storage.index import (
    IndexTable,
    compact,
    declare_class_names,
    read_class_names,
)
from storage.index_view import STATUSES, IndexView, index_record
from storage.layout import (
    CorruptVideoError,
    check_chunk_count,
    float16_streams,
    read_direct,
    read_zarr,
    record_from_group,
    write_group,
    write_stream,
)
from storage.root import (
    check_store_path,
    check_version,
    initialise_root,
    open_root,
    settled_root,
)
from storage.summary import summarize
from storage.times import StreamTimes, stream_times
from storage.values import jsonable, node_attr, now
from storage.verify import find_damaged

log = logging.getLogger(__name__)

Mode = Literal["r", "r+", "a"]


def _described(
    label: str | None, split: str | None, group: str | None, meta: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The descriptive attrs of a video's group: label, split, group (when given) and meta."""
    return {
        "label": label,
        "split": split,
        **({"group": str(group)} if group is not None else {}),
        **jsonable(dict(meta or {})),
    }


class FeatureStore:
    """Per-frame features of many videos in one Zarr v3 group.

    Use :meth:`create` for a new (or existing) store and :meth:`open` for an existing one.
    """

    def __init__(self, root: zarr.Group, path: str, mode: Mode) -> None:
        self._root = root
        self.path = path
        self.mode = mode
        self._files = files_for(path)
        self._index = IndexView(root, path, mode, self._files)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        extractor: Mapping[str, Any] | None = None,
        class_names: list[str] | None = None,
        exist_ok: bool = True,
    ) -> FeatureStore:
        """Create a store at ``path`` (a local path or an fsspec URL).

        With ``exist_ok`` (the default) an existing framepool store is opened for writing and
        ``extractor`` must agree with what it records, so that one store never mixes features from
        two different extractors. ``class_names`` are added to the recorded ones (see
        :attr:`class_names`; any number of processes may do so at once).
        """
        spath = str(path)
        check_store_path(spath)
        root, attrs = settled_root(spath)
        if attrs.get("schema_version") is None:
            initialise_root(root, spath, extractor, class_names)
            store = cls(root, spath, "a")
            store._index.ensure_group()
            if class_names:  # two processes creating one store at once both write the attrs
                declare_class_names(store._files, class_names)
            return store
        if not exist_ok:
            raise FileExistsError(f"a feature store already exists at {spath!r}")
        store = cls(root, spath, "a")
        store._check_version()
        if extractor:
            store._merge_extractor(dict(extractor))
        if class_names:
            store.add_class_names(class_names)
        return store

    @classmethod
    def open(cls, path: str | Path, mode: Mode = "r") -> FeatureStore:
        """Open an existing store; ``mode`` is ``"r"`` (read only), ``"r+"`` or ``"a"``."""
        if mode not in ("r", "r+", "a"):
            raise ValueError(f"mode must be 'r', 'r+' or 'a', got {mode!r}")
        spath = str(path)
        root = open_root(spath, mode)
        store = cls(root, spath, mode)
        store._check_version()
        return store

    def _check_version(self) -> None:
        check_version(self._root, self.path)

    def _writable(self) -> None:
        if self.mode == "r":
            raise PermissionError(f"feature store {self.path!r} is open read-only")

    # ------------------------------------------------------------------ root attrs
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._root.attrs)

    @property
    def extractor(self) -> dict[str, Any]:
        """The extractor configuration per stream: recorded at creation, and declared since by
        any writer (:mod:`storage.declarations`, merged on read)."""
        return merged_extractor(self._files, dict(node_attr(self._root, "extractor", {})))[0]

    def _merge_extractor(self, extractor: dict[str, Any]) -> None:
        """Declare the streams of ``extractor`` the store does not hold yet; a stream it holds
        with another configuration is an error. Safe with many writers: the new streams go to a
        declaration file of their own, read back so that a concurrent conflicting declaration
        that came first is noticed (this one is then withdrawn)."""
        new = new_streams(self.path, self.extractor, jsonable(extractor))
        if new:
            self._writable()
            declare_streams(self._files, self.path, new)

    @property
    def class_names(self) -> list[str]:
        """Sorted class names: those declared (by :meth:`create` or :meth:`add_class_names`, in
        any process) and the labels of the stored videos.

        Declarations are immutable files merged on read (:func:`storage.index.declare_class_names`)
        and labels come from the index, so writers adding names at once never lose one; no file
        is read, changed and written back. The root ``class_names`` attr of older stores counts
        as a declaration."""
        names = self._declared_class_names()
        labels = set(self._index.table().text["label"].tolist())
        return sorted(names | {str(label) for label in labels if label is not None})

    def _declared_class_names(self) -> set[str]:
        return {str(n) for n in node_attr(self._root, "class_names", [])} | read_class_names(
            self._files
        )

    def add_class_names(self, names: list[str]) -> None:
        """Declare class names (e.g. classes no stored video has yet); safe with many writers."""
        self._writable()
        new = sorted({str(n) for n in names} - self._declared_class_names())
        if new:
            declare_class_names(self._files, new)

    # ------------------------------------------------------------------ the index
    def close(self) -> None:
        """Freeze this writer's index part and compact the index (also done when the store
        object is collected or the interpreter exits); the store stays usable."""
        self._index.close()

    def refresh(self) -> None:
        """Forget the loaded index, so that the next query sees other writers' changes."""
        self._index.refresh()

    def index_table(self, status: str | None = "complete") -> IndexTable:
        """The metadata index as columns (:class:`storage.index.IndexTable`), one row per video
        with ``status`` (None: any), sorted by id."""
        table = self._index.table()
        if status is None:
            return table
        return table.take(np.flatnonzero(table.text["status"] == status))

    def reindex(self) -> dict[str, int]:
        """Rebuild the index from the per-video groups and replace every index file with it.

        Run it when no other process is writing to the store (records they append to a part
        that existed before the rebuild would be dropped with it).
        """
        self._writable()
        return self._index.reindex()

    def compact_index(self) -> int:
        """Merge the frozen index parts into one file (safe while others write)."""
        self._writable()
        return compact(self._files)

    # ------------------------------------------------------------------ videos
    def _videos_group(self) -> zarr.Group:
        if "videos" not in self._root:
            if self.mode == "r":
                raise KeyError(f"store {self.path!r} has no /videos group")
            return self._root.require_group("videos")
        grp = self._root["videos"]
        assert isinstance(grp, zarr.Group)
        return grp

    def write_video(
        self,
        video_id: str,
        streams: Mapping[str, np.ndarray],
        *,
        label: str | None = None,
        split: str | None = None,
        group: str | None = None,
        meta: Mapping[str, Any] | None = None,
        overwrite: bool = True,
    ) -> None:
        """Write all streams of one video, then mark it ``complete``.

        ``streams`` maps a stream name to a ``[T, d]`` array (stored as float16); every stream of
        one video has the same T. A map stream is ``[T', h, w, C]`` with its own T'. A video
        already ``complete`` is rewritten only with ``overwrite``. ``group`` names what the
        video shares with others that a model must not learn to recognise (a subject, a
        recording session, UCF101's ``gNN``): the trainer keeps a group's videos on one side of
        its validation split.

        Steps: a ``pending`` index record; the group, created ``incomplete``; the arrays; one
        metadata write that sets status, error and extracted_at together; the index record. A
        crash at any point leaves the video absent or ``incomplete``, never ``complete`` early.
        """
        self._writable()
        arrays = float16_streams(video_id, streams)
        if not overwrite:
            current = self._index.record(video_id)
            if current is not None and current.get("status") == "complete":
                raise FileExistsError(f"video {video_id!r} is already complete in {self.path!r}")

        attrs = {
            **_described(label, split, group, meta),
            "status": "incomplete",
            "streams": sorted(arrays),
        }
        self._index.begin(video_id)
        # The group is (re)created "incomplete"; only its last write below marks it complete.
        self._clear_group(video_id)
        write_group(self._files, video_id, attrs)
        shapes_out = {}
        for name, a16 in arrays.items():
            rows = write_stream(self._files, video_id, name, a16)
            # map streams [T', h, w, C] are read through Zarr (rows -1); the index keeps T' and C
            direct = rows if a16.ndim == 2 else -1
            shapes_out[name] = [int(a16.shape[0]), int(a16.shape[-1]), direct]
        done = {"status": "complete", "error": None, "extracted_at": now()}
        write_group(self._files, video_id, {**attrs, **done})  # one write: status, error, time
        self._index.log([index_record(video_id, {**attrs, **done}, shapes_out)])

    def _clear_group(self, video_id: str) -> None:
        """Remove a previous version of the group (its old chunks must not outlive it)."""
        if self._files.list(f"videos/{video_id}"):
            self._files.remove_tree(f"videos/{video_id}")

    def _group_attrs(self, video_id: str) -> dict[str, Any]:
        raw = self._files.read(f"videos/{video_id}/zarr.json")
        if raw is None:
            raise KeyError(f"video {video_id!r} is not in store {self.path!r}")
        return dict(json.loads(raw).get("attributes") or {})

    def mark_failed(
        self,
        video_id: str,
        error: str,
        *,
        label: str | None = None,
        split: str | None = None,
        group: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Record that ``video_id`` could not be extracted and why (no feature arrays)."""
        self._writable()
        attrs = {
            **_described(label, split, group, meta),
            "status": "failed",
            "error": str(error),
            "extracted_at": now(),
            "streams": [],
        }
        self._index.begin(video_id)
        self._clear_group(video_id)
        write_group(self._files, video_id, jsonable(attrs))
        self._index.log([index_record(video_id, attrs, {})])

    def mark_damaged(self, video_id: str, reason: str) -> None:
        """Mark a stored video ``incomplete`` because its data is damaged, so that the next
        ``extract`` redoes it; the reason is kept in its ``error``."""
        self._writable()
        attrs = self._group_attrs(video_id)
        self._index.begin(video_id)
        attrs.update(status="incomplete", error=f"damaged: {reason}")
        write_group(self._files, video_id, attrs)
        self._index.log([record_from_group(self._files, video_id)])

    def delete_video(self, video_id: str) -> None:
        self._writable()
        if self._files.list(f"videos/{video_id}"):
            self._index.begin(video_id)
            self._files.remove_tree(f"videos/{video_id}")
            self._index.log([{"id": video_id, "op": "del"}])

    def status(self, video_id: str) -> str | None:
        """``complete``, ``failed``, ``incomplete``, or None when the video is absent."""
        rec = self._index.record(video_id)
        return None if rec is None else str(rec.get("status") or "incomplete")

    def video_attrs(self, video_id: str) -> dict[str, Any]:
        """Every attr of one video, read from its group."""
        return self._group_attrs(video_id)

    def update_video_attrs(self, video_id: str, **attrs: Any) -> None:
        """Change descriptive attrs (label, split, ...) of a stored video; never its status."""
        self._writable()
        if "status" in attrs:
            raise ValueError("status is set by write_video/mark_failed only")
        current = self._group_attrs(video_id)
        self._index.begin(video_id)
        write_group(self._files, video_id, {**current, **jsonable(attrs)})
        self._index.log([record_from_group(self._files, video_id)])

    def _shapes(self, video_id: str) -> dict[str, list[int]]:
        rec = self._index.record(video_id)
        if rec is None:
            raise KeyError(f"video {video_id!r} is not in store {self.path!r}")
        return dict(rec.get("shapes") or {})

    def streams(self, video_id: str) -> list[str]:
        return sorted(self._shapes(video_id))

    def n_frames(self, video_id: str, stream: str) -> int:
        shapes = self._shapes(video_id)
        if stream not in shapes:
            raise KeyError(f"video {video_id!r} has no stream {stream!r}; it has {sorted(shapes)}")
        return int(shapes[stream][0])

    def read(self, video_id: str, stream: str, dtype: Any = np.float32) -> np.ndarray:
        """The ``[T, d]`` features of one stream of a complete video (float32 by default;
        ``dtype=np.float16`` returns the stored values without a conversion).

        Damage (a missing, truncated or altered chunk file) raises :class:`CorruptVideoError`
        naming the video and the file; it never reads back as zeros.
        """
        rec = self._index.record(video_id)
        if rec is None:
            raise KeyError(f"video {video_id!r} is not in store {self.path!r}")
        if rec.get("status") != "complete":
            raise ValueError(
                f"video {video_id!r} in {self.path!r} is {rec.get('status')}, not complete"
            )
        shapes = rec.get("shapes") or {}
        if stream not in shapes:
            raise KeyError(f"video {video_id!r} has no stream {stream!r}; it has {sorted(shapes)}")
        t, d, rows = (int(x) for x in shapes[stream])
        if rows > 0:
            data = read_direct(self._files, video_id, stream, t, d, rows, self.path)
        else:
            data = read_zarr(self._root, video_id, stream, self.path)
            if (data.shape[0], data.shape[-1]) != (t, d):
                raise CorruptVideoError(
                    f"video {video_id!r} in {self.path!r}: stream {stream!r} has shape "
                    f"{data.shape}, the index records {(t, d)}; run `framepool store reindex`",
                    video_id,
                    f"videos/{video_id}/{stream}",
                )
        return data.astype(dtype, copy=False)

    def times(self, video_id: str, stream: str) -> StreamTimes:
        """Presentation time in seconds of every row of ``stream`` (:class:`StreamTimes`: a
        window's centre and span for window backbones); a store written without times gives
        times derived from fps and frame indices, marked ``derived``."""
        n = self.n_frames(video_id, stream)
        return stream_times(video_id, stream, self._group_attrs(video_id), n)

    def read_many(
        self,
        video_ids: Sequence[str],
        stream: str,
        dtype: Any = np.float32,
        *,
        threads: int = 8,
    ) -> list[np.ndarray]:
        """:meth:`read` of many videos with a thread pool (file reads and decoding release the
        GIL); results in the order of ``video_ids``."""
        if threads <= 1 or len(video_ids) <= 1:
            return [self.read(v, stream, dtype) for v in video_ids]
        with ThreadPoolExecutor(min(threads, len(video_ids))) as pool:
            return list(pool.map(lambda v: self.read(v, stream, dtype), video_ids))

    def verify(
        self, *, workers: int = 8, mark: bool = False, progress: Any = None
    ) -> list[dict[str, str]]:
        """Read every stream of every complete video (in ``workers`` threads) and return the
        damaged ones as ``{"video_id", "key", "error"}``, sorted by id.

        Damage: a chunk file missing, truncated or altered (checksum), or for arrays written
        before the checksummed layout, fewer chunk files than the array's shape needs. With
        ``mark`` (a writable store) damaged videos are marked ``incomplete`` (see
        :meth:`mark_damaged`), so that the next ``extract`` redoes them. ``progress`` is called
        with the number of videos checked so far.
        """
        damaged = find_damaged(self.videos(), self._check_video, workers=workers, progress=progress)
        if mark and damaged:
            self._writable()
            for r in damaged:
                self.mark_damaged(r["video_id"], f"{r['key']}: {r['error']}")
        return damaged

    def _check_video(self, video_id: str) -> None:
        """Read every stream of one video; CorruptVideoError naming the first damage found."""
        for stream in self.streams(video_id):
            self.read(video_id, stream, np.float16)
            if int(self._shapes(video_id)[stream][2]) <= 0:
                check_chunk_count(self._files, video_id, stream, self.path)

    def videos(self, split: str | None = None, status: str | None = "complete") -> list[str]:
        """Sorted video ids with the given ``status`` (None: any) and ``split``.

        ``split`` matches a video's ``split`` attr, or names a part of an imported split list as
        ``<list>/<part>`` (e.g. ``ucf101-1/train``). Answered from the index.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES} or None, got {status!r}")
        members: set[str] | None = None
        if split is not None and "/" in split:
            name, part = split.split("/", 1)
            lists = self.split_lists()
            if name not in lists or part not in lists[name]:
                raise KeyError(
                    f"split {split!r} not found in {self.path!r}; known: "
                    f"{[f'{n}/{p}' for n, parts in lists.items() for p in parts]}"
                )
            members = set(lists[name][part])
        table = self._index.table()
        keep = np.ones(len(table), dtype=bool)
        if status is not None:
            keep &= table.text["status"] == status
        if split is not None and members is None:
            keep &= table.text["split"] == split
        ids: list[str] = table.ids[keep].tolist()
        if members is not None:
            ids = [v for v in ids if v in members]
        return ids

    def all_video_attrs(self, status: str | None = None) -> dict[str, dict[str, Any]]:
        """The indexed attrs of every video with ``status`` (any when None), from the index:
        label, split, status, error, extracted_at, source, source_sha256, n_frames, streams.
        (:meth:`video_attrs` reads every attr of one video from its group.)"""
        table = self.index_table(status)
        out = {}
        for i in range(len(table)):
            rec = table.record(i)
            vid = rec.pop("id")
            shapes = rec.pop("shapes")
            for k in ("op", "t"):
                rec.pop(k)
            rec["streams"] = sorted(shapes)
            out[vid] = rec
        return out

    def iter_videos(self, **kw: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        for vid in self.videos(**kw):
            yield vid, self.video_attrs(vid)

    def _column(self, video_ids: list[str], name: str) -> Iterator[tuple[str, Any]]:
        """``(video_id, value)`` of the index column ``name`` (None where absent) for each of
        ``video_ids``, in order; KeyError naming the first video that is not in the store."""
        table = self._index.table()
        rows = self._index.row_map(table)
        column = table.text.get(name)
        for vid in video_ids:
            row = rows.get(vid)
            if row is None:
                raise KeyError(f"video {vid!r} is not in store {self.path!r}")
            yield vid, None if column is None else column[row]

    def groups(self, video_ids: list[str]) -> list[str | None]:
        """Groups of ``video_ids`` from the index (None for a video without one; see
        :meth:`write_video`); KeyError naming the first video that is not in the store."""
        return [None if g is None else str(g) for _, g in self._column(video_ids, "group")]

    def labels(self, video_ids: list[str]) -> list[str]:
        """Labels of ``video_ids`` from the index; ValueError naming the first video without
        one, KeyError naming the first that is not in the store."""
        out = []
        for vid, label in self._column(video_ids, "label"):
            if label is None:
                raise ValueError(f"video {vid!r} in {self.path!r} has no label")
            out.append(str(label))
        return out

    # ------------------------------------------------------------------ splits
    def split_lists(self) -> dict[str, dict[str, list[str]]]:
        """Named split lists ``{name: {part: [video_id, ...]}}`` (:meth:`set_split_list`)."""
        recorded = (
            dict(node_attr(self._root["splits"], "lists", {})) if "splits" in self._root else {}
        )
        return merged_splits(self._files, recorded)

    def set_split_list(self, name: str, parts: Mapping[str, list[str]]) -> None:
        """Record a named split list, e.g. ``ucf101-1`` with parts ``train`` and ``test``
        (replacing a list of that name). Safe with many writers: each list is a declaration
        file of its own (:mod:`storage.declarations`), so writers never lose each other's."""
        self._writable()
        if not name or "/" in name:
            raise ValueError(f"split list name {name!r} must be non-empty and contain no '/'")
        lists = {name: {str(p): sorted(map(str, ids)) for p, ids in parts.items()}}
        declare(self._files, SPLITS, lists)

    # ------------------------------------------------------------------ cache
    def read_cache(self, name: str, key: str) -> dict[str, Any] | None:
        """Arrays and attrs cached under ``/cache/<name>/<key>``, or None when absent/incomplete
        (:mod:`storage.cache`)."""
        return read_cache(self._root, name, key)

    def write_cache(
        self,
        name: str,
        key: str,
        shapes: Mapping[str, tuple[tuple[int, ...], str, tuple[int, ...]]],
        attrs: Mapping[str, Any] | None = None,
        *,
        raw: bool = False,
    ) -> dict[str, zarr.Array]:
        """Create empty cache arrays ``{array: (shape, dtype, chunks)}`` under a fresh group.

        Fill them, then call :meth:`finish_cache`; until then the cache reads as absent. Older
        entries under ``/cache/<name>`` (other keys) are removed: they were derived from data that
        has since changed. ``raw`` stores chunks uncompressed with a crc32c each and NaN as the
        fill value of float arrays (fast block reads; a lost chunk reads as NaN, not zeros).
        """
        self._writable()
        return write_cache(self._root, name, key, shapes, attrs, raw=raw)

    def finish_cache(self, name: str, key: str) -> None:
        finish_cache(self._root, name, key)

    # ------------------------------------------------------------------ summary
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: counts by status, split and class, streams and dims, failures.
        Answered from the index (:func:`storage.summary.summarize`)."""
        table = self._index.table()
        return summarize(self.path, table, self.attrs, self.class_names, self.split_lists())
