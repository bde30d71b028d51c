"""One store's view of its metadata index (:mod:`storage.index`): loaded once, kept in step with
its own writes, reconciled with the per-video groups.

:class:`IndexView` is the part of :class:`~storage.store.FeatureStore` that answers "which videos,
with which attrs and shapes" without opening a video group. It owns the store's index writer (one
live part per writing store object), the merged table (one row per video, sorted by id) and the
overlay of records this store wrote since the table was built. A record whose last word is
``pending`` (a change under way) is read from its group, so that a crash in the middle of a write
never shows stale metadata.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsGroupError

from storage.files import Files
from storage.index import (
    INDEX_DIR,
    INDEX_FORMAT,
    PENDING,
    PUT,
    ROLL,
    TEXT_FIELDS,
    IndexTable,
    IndexWriter,
    compact,
    concat,
    latest,
    read_index,
    write_base,
)
from storage.layout import record_from_group

log = logging.getLogger(__name__)

STATUSES = ("complete", "failed", "incomplete")


def index_record(
    video_id: str, attrs: Mapping[str, Any], shapes: Mapping[str, list[int]]
) -> dict[str, Any]:
    """The ``put`` record of a video with ``attrs`` and stream ``shapes`` (``[T, d, rows]``)."""
    rec: dict[str, Any] = {"id": video_id, "op": "put"}
    for key in TEXT_FIELDS:
        rec[key] = attrs.get(key)
    rec["n_frames"] = attrs.get("n_frames")
    rec["shapes"] = dict(shapes)
    return rec


def _close_quietly(writer: IndexWriter) -> None:
    try:
        writer.close()
    except Exception:  # at exit a filesystem may be gone; the live part stays valid as it is
        log.debug("could not freeze index part %s", writer.name, exc_info=True)


class IndexView:
    """The index of the store at ``path`` (root group ``root``, files ``files``) as one store
    object opened with ``mode`` sees it; thread-safe."""

    def __init__(self, root: zarr.Group, path: str, mode: str, files: Files) -> None:
        self._root = root
        self.path = path
        self.mode = mode
        self._files = files
        self._writer: IndexWriter | None = None
        self._closer: weakref.finalize | None = None
        self._table: IndexTable | None = None  # the loaded index, one row per video
        self._rows: dict[str, int] | None = None  # id -> row of _table
        self._overlay: dict[str, dict[str, Any]] = {}  # own records since _table was built
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ writing
    def _index_writer(self) -> IndexWriter:
        if self._writer is None:
            self._writer = IndexWriter(self._files)
            self._closer = weakref.finalize(self, _close_quietly, self._writer)
        return self._writer

    def close(self) -> None:
        """Freeze this writer's index part and compact the index."""
        if self._writer is not None:
            self._writer.close()

    def log(self, records: list[dict[str, Any]]) -> None:
        """Append records to this writer's index part and to the in-memory view."""
        stamped = self._index_writer().append(records)
        with self._lock:
            for rec in stamped:
                self._overlay[str(rec["id"])] = rec

    def begin(self, video_id: str) -> None:
        """Announce a change of ``video_id``: until its closing record, the group is the truth."""
        self.log([{"id": video_id, "op": "pending"}])

    def ensure_group(self) -> None:
        """Create the ``/index`` group when absent (another writer may create it meanwhile)."""
        if "index" not in self._root:
            with contextlib.suppress(ContainsGroupError):
                self._root.create_group(
                    "index",
                    attributes={"format": INDEX_FORMAT, "about": "framepool metadata index"},
                )

    # ------------------------------------------------------------------ reading groups
    def resolve(self, ids: list[str]) -> list[dict[str, Any]]:
        """Records of ``ids`` read from their groups (in parallel), stamped before the read so
        that a writer finishing meanwhile has the newer record."""
        if not ids:
            return []
        stamp = time.time_ns() if self._writer is None else self._writer.stamp()
        workers = min(16, len(ids))
        if workers == 1:
            recs = [record_from_group(self._files, ids[0])]
        else:
            with ThreadPoolExecutor(workers) as pool:
                recs = list(pool.map(lambda v: record_from_group(self._files, v), ids))
        for rec in recs:
            rec["t"] = stamp
        return recs

    def listing(self) -> list[str]:
        """The names of the per-video groups (unsorted; a list: hashing 240,000 names into a set
        costs as much as listing them)."""
        return [n for n in self._files.list("videos") if n != "zarr.json" and n[:1] != "."]

    def _reconcile(self, table: IndexTable, listed: list[str]) -> tuple[list[str], set[str]]:
        """The videos to read from their groups (pending, or not in the index) and the indexed
        videos whose group is gone."""
        live_ids = table.ids[table.op == PUT]
        pending = table.ids[table.op == PENDING].tolist()
        names = np.array(listed, dtype=str)
        names.sort()
        if not pending and np.array_equal(names, live_ids):
            return [], set()  # the usual case, checked in C: index and groups agree
        listing = set(listed)
        known = set(live_ids.tolist())
        return sorted((listing - known) | set(pending)), known - listing

    def _load(self) -> IndexTable:
        """Merge the index parts, then reconcile them with the groups: videos whose last record is
        pending, and groups the index does not know, are read from their groups; indexed videos
        whose group is gone are dropped. A store without an index gets one built."""
        found = read_index(self._files)
        listed = self.listing()
        if found is None and listed:
            log.info(
                "store %s has no metadata index: building it from %d video groups",
                self.path,
                len(listed),
            )
        table = IndexTable.empty() if found is None else found[0]
        unknown, gone = self._reconcile(table, listed)
        if gone:
            log.warning(
                "store %s: %d indexed videos have no group (e.g. %r); dropped from the view",
                self.path,
                len(gone),
                sorted(gone)[0],
            )
        if len(unknown) > 1000:
            log.info("store %s: reading %d video groups into the index", self.path, len(unknown))
        resolved = self.resolve(unknown)
        if resolved and self.mode != "r":
            self._index_writer().append(resolved)
            if found is None and len(resolved) >= ROLL:
                compact(self._files)
        if self.mode != "r" and found is None:
            self.ensure_group()
        merged = latest(concat([table, IndexTable.from_records(resolved)]))
        keep = merged.op == PUT
        if gone:
            keep &= ~np.isin(merged.ids, np.array(sorted(gone), dtype=str))
        return merged.take(np.flatnonzero(keep))

    # ------------------------------------------------------------------ the view
    def table(self) -> IndexTable:
        """The index as this store sees it: one row per video (sorted by id), own writes
        included. Loaded on first use; :meth:`refresh` reloads it (other writers' changes)."""
        with self._lock:
            if self._table is None:
                self._table = self._load()
                self._rows = None
            if self._overlay:
                recs = list(self._overlay.values())
                pending = [str(r["id"]) for r in recs if r.get("op") == "pending"]
                if pending:
                    done = {str(r["id"]): r for r in self.resolve(pending)}
                    recs = [done.get(str(r["id"]), r) for r in recs]
                merged = latest(concat([self._table, IndexTable.from_records(recs)]))
                self._table = merged.take(np.flatnonzero(merged.op == PUT))
                self._overlay = {}
                self._rows = None
            return self._table

    def refresh(self) -> None:
        """Forget the loaded index, so that the next query sees other writers' changes."""
        with self._lock:
            self._table, self._rows, self._overlay = None, None, {}

    def row_map(self, table: IndexTable) -> dict[str, int]:
        """Video id -> row of ``table`` (the current view)."""
        with self._lock:
            if self._rows is None:
                self._rows = {v: i for i, v in enumerate(table.ids.tolist())}
            return self._rows

    def record(self, video_id: str) -> dict[str, Any] | None:
        """The index record of one video (None when absent); no full view rebuild."""
        with self._lock:
            rec = self._overlay.get(video_id)
            if rec is not None:
                if rec.get("op") == "pending":
                    rec = self.resolve([video_id])[0]
                return rec if rec.get("op") == "put" else None
            if self._table is None:
                self.table()
            assert self._table is not None
            if self._rows is None:
                self._rows = {v: i for i, v in enumerate(self._table.ids.tolist())}
            row = self._rows.get(video_id)
            return None if row is None else self._table.record(row)

    # ------------------------------------------------------------------ maintenance
    def reindex(self) -> dict[str, int]:
        """Rebuild the index from the per-video groups and replace every index file with it
        (see :meth:`storage.store.FeatureStore.reindex`)."""
        self.ensure_group()
        before = [
            n for n in self._files.list(INDEX_DIR) if n.endswith(".jsonl") or n.endswith(".npz")
        ]
        ids = sorted(self.listing())
        resolved = self.resolve(ids)
        table = latest(IndexTable.from_records(resolved))
        table = table.take(np.flatnonzero(table.op == PUT))
        write_base(self._files, table)
        for name in before:
            self._files.remove(f"{INDEX_DIR}/{name}")
        if self._writer is not None:  # its next record starts a new part
            self._writer.seq += 1
            self._writer.buffer = []
        self.refresh()
        counts = Counter(table.text["status"].tolist())
        return {"videos": len(table), **{s: counts.get(s, 0) for s in STATUSES}}
