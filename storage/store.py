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
damage raises :class:`CorruptVideoError` instead of reading back as zeros.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.errors import ContainsGroupError

from storage.declarations import (
    EXTRACTOR,
    SPLITS,
    conflicting_declarations,
    declare,
    merged_extractor,
    merged_splits,
    withdraw,
)
from storage.files import files_for
from storage.ids import safe_video_id
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
    declare_class_names,
    latest,
    read_class_names,
    read_index,
    write_base,
)
from storage.layout import (
    CorruptVideoError,
    read_direct,
    read_zarr,
    record_from_group,
    write_group,
    write_stream,
)
from storage.times import StreamTimes, stream_times

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("complete", "failed", "incomplete")
Mode = Literal["r", "r+", "a"]

try:  # the installed distribution's version, recorded in every store it creates
    from importlib.metadata import version as _version

    FRAMEPOOL_VERSION = _version("framepool")
except Exception:  # pragma: no cover - running from a source tree that is not installed
    FRAMEPOOL_VERSION = "0+unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_url(path: str) -> bool:
    return "://" in path


def _attr(node: zarr.Group | zarr.Array, key: str, default: Any = None) -> Any:
    """One attribute of a Zarr node, typed as Any (attrs are JSON values)."""
    value: Any = node.attrs.get(key, default)
    return default if value is None else value


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars and paths inside attrs to plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _close_quietly(writer: IndexWriter) -> None:
    try:
        writer.close()
    except Exception:  # at exit a filesystem may be gone; the live part stays valid as it is
        log.debug("could not freeze index part %s", writer.name, exc_info=True)


def _index_record(
    video_id: str, attrs: Mapping[str, Any], shapes: Mapping[str, list[int]]
) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": video_id, "op": "put"}
    for key in TEXT_FIELDS:
        rec[key] = attrs.get(key)
    rec["n_frames"] = attrs.get("n_frames")
    rec["shapes"] = dict(shapes)
    return rec


def _check_chunk_count(files: Any, video_id: str, stream: str, where: str) -> None:
    """Arrays in an older layout (fill value 0, no checksum) read a lost chunk as zeros: count
    their chunk files against the shape instead."""
    base = f"videos/{video_id}/{stream}"
    raw = files.read(f"{base}/zarr.json")
    meta = json.loads(raw) if raw else {}
    try:
        t = int(meta["shape"][0])
        rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        raise CorruptVideoError(
            f"video {video_id!r} in {where!r}: unreadable array metadata {base}/zarr.json",
            video_id,
            f"{base}/zarr.json",
        ) from None
    for i in range(-(-t // rows)):
        if "0" not in files.list(f"{base}/c/{i}"):
            key = f"{base}/c/{i}/0"
            raise CorruptVideoError(
                f"video {video_id!r} in {where!r} is damaged: chunk file {key!r} of stream "
                f"{stream!r} is missing (this array would read it back as zeros)",
                video_id,
                key,
            )


_OWN_MEMBERS = {"videos", INDEX_DIR}


def check_store_path(path: str | Path) -> None:
    """Raise when ``path`` can be neither an existing store nor a new one, before any work: an
    existing file (NotADirectoryError) or a folder with content that is not a Zarr group
    (ValueError naming a few of its entries); a store is never created over someone's folder.
    An absent path, an empty folder and any Zarr group pass (:meth:`FeatureStore.create` checks
    the group), as do URLs (checked when opened)."""
    spath = str(path)
    if _is_url(spath):
        return
    p = Path(spath).expanduser()
    if not p.exists():
        return
    if not p.is_dir():
        raise NotADirectoryError(f"{spath!r} is a file, not a feature store (a folder)")
    if (p / "zarr.json").is_file():
        return
    entries = sorted(e.name for e in p.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (
            f" and {len(entries) - 3} more" if len(entries) > 3 else ""
        )
        raise ValueError(
            f"{spath!r} is a folder with other content ({shown}), not a feature store; give a "
            "new path, an empty folder or an existing store"
        )


def _open_or_create_root(path: str) -> zarr.Group:
    """The root group at ``path``, created when absent. Processes creating one store at once
    race on its root: the loser of the race sees the winner's group and opens it."""
    for _attempt in range(50):
        try:
            return zarr.open_group(path, mode="a")
        except ContainsGroupError:  # created between zarr's check and its write: open it
            time.sleep(0.01)
        except Exception as exc:
            raise OSError(f"cannot create a feature store at {path!r}: {exc}") from exc
    raise OSError(f"cannot create a feature store at {path!r}: its root kept changing")


class FeatureStore:
    """Per-frame features of many videos in one Zarr v3 group.

    Use :meth:`create` for a new (or existing) store and :meth:`open` for an existing one.
    """

    def __init__(self, root: zarr.Group, path: str, mode: Mode) -> None:
        self._root = root
        self.path = path
        self.mode = mode
        self._files = files_for(path)
        self._writer: IndexWriter | None = None
        self._closer: weakref.finalize | None = None
        self._table: IndexTable | None = None  # the loaded index, one row per video
        self._rows: dict[str, int] | None = None  # id -> row of _table
        self._overlay: dict[str, dict[str, Any]] = {}  # own records since _table was built
        self._lock = threading.RLock()

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
        root = _open_or_create_root(spath)
        attrs = dict(root.attrs)
        for _attempt in range(20):
            if attrs.get("schema_version") is not None or not list(root.keys()):
                break
            # another process may be creating this store right now: it writes the root attrs
            # before any member, so a member seen means its attrs can be read back (soon)
            time.sleep(0.01 * _attempt)
            root = zarr.open_group(spath, mode="a")
            attrs = dict(root.attrs)
        if attrs.get("schema_version") is None:
            if not set(root.keys()) <= _OWN_MEMBERS:
                # (only the store's own members and no attrs: two creators raced on the root
                # document and the second one's empty document replaced the first one's
                # attrs; they are written again below)
                raise ValueError(
                    f"{spath!r} is a Zarr group with content but not a framepool store "
                    "(no schema_version attribute)"
                )
            root.attrs.update(
                {
                    "schema_version": SCHEMA_VERSION,
                    "created_by": f"framepool {FRAMEPOOL_VERSION}",
                    "created_at": _now(),
                    "extractor": _jsonable(dict(extractor or {})),
                    "class_names": sorted(set(class_names or [])),
                }
            )
            with contextlib.suppress(ContainsGroupError):  # a concurrent creator made it
                root.require_group("videos")
            store = cls(root, spath, "a")
            store._ensure_index_group()
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
        if not _is_url(spath) and not Path(spath).exists():
            raise FileNotFoundError(f"no framepool store at {spath} (no such path)")
        try:
            root = zarr.open_group(spath, mode="r" if mode == "r" else "r+")
        except Exception as exc:  # zarr: "No group found in store ... at path ''"
            raise FileNotFoundError(
                f"no framepool store at {spath} (not a Zarr group; create one with framepool "
                "extract)"
            ) from exc
        store = cls(root, spath, mode)
        store._check_version()
        return store

    def _check_version(self) -> None:
        version = _attr(self._root, "schema_version")
        if version is None:
            raise ValueError(
                f"no framepool store at {self.path} (a Zarr group without schema_version)"
            )
        if int(version) > SCHEMA_VERSION:
            raise ValueError(
                f"{self.path!r} has schema_version {version}; this framepool reads up to "
                f"{SCHEMA_VERSION}"
            )

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
        return merged_extractor(self._files, dict(_attr(self._root, "extractor", {})))[0]

    def _merge_extractor(self, extractor: dict[str, Any]) -> None:
        """Declare the streams of ``extractor`` the store does not hold yet; a stream it holds
        with another configuration is an error. Safe with many writers: the new streams go to a
        declaration file of their own, read back so that a concurrent conflicting declaration
        that came first is noticed (this one is then withdrawn)."""
        current = self.extractor
        extractor = _jsonable(extractor)

        def conflict(stream: str, held: Any, cfg: Any) -> ValueError:
            return ValueError(
                f"store {self.path!r} holds stream {stream!r} extracted with "
                f"{held}, which differs from the requested {cfg}; "
                "use a new store (or remove the stream) to change the extractor"
            )

        for stream, cfg in extractor.items():
            if stream in current and current[stream] != cfg:
                raise conflict(stream, current[stream], cfg)
        new = {s: cfg for s, cfg in extractor.items() if s not in current}
        if not new:
            return
        self._writable()
        name = declare(self._files, EXTRACTOR, new)
        rivals = conflicting_declarations(self._files, name, new)
        if rivals:
            # Any other visible declaration of one of these streams with another configuration
            # makes this one withdraw, whichever sorts first: the rival may have listed before
            # this file existed and taken the stream, and only "no rival seen after my own write"
            # rules out two winners (both may lose; neither is ever silently overridden).
            withdraw(self._files, name)
            stream, held = rivals[0]
            raise ValueError(
                f"store {self.path!r}: stream {stream!r} was declared at the same time with "
                f"{held}, which differs from the requested {new[stream]}; "
                "check the store's extractor and retry"
            )

    @property
    def class_names(self) -> list[str]:
        """Sorted class names: those declared (by :meth:`create` or :meth:`add_class_names`, in
        any process) and the labels of the stored videos.

        Declarations are immutable files merged on read (:func:`storage.index.declare_class_names`)
        and labels come from the index, so writers adding names at once never lose one; no file
        is read, changed and written back. The root ``class_names`` attr of older stores counts
        as a declaration."""
        names = self._declared_class_names()
        labels = set(self._view().text["label"].tolist())
        return sorted(names | {str(label) for label in labels if label is not None})

    def _declared_class_names(self) -> set[str]:
        return {str(n) for n in _attr(self._root, "class_names", [])} | read_class_names(
            self._files
        )

    def add_class_names(self, names: list[str]) -> None:
        """Declare class names (e.g. classes no stored video has yet); safe with many writers."""
        self._writable()
        new = sorted({str(n) for n in names} - self._declared_class_names())
        if new:
            declare_class_names(self._files, new)

    # ------------------------------------------------------------------ the index
    def _index_writer(self) -> IndexWriter:
        if self._writer is None:
            self._writer = IndexWriter(self._files)
            self._closer = weakref.finalize(self, _close_quietly, self._writer)
        return self._writer

    def close(self) -> None:
        """Freeze this writer's index part and compact the index (also done when the store
        object is collected or the interpreter exits); the store stays usable."""
        if self._writer is not None:
            self._writer.close()

    def _log(self, records: list[dict[str, Any]]) -> None:
        """Append records to this writer's index part and to the in-memory view."""
        stamped = self._index_writer().append(records)
        with self._lock:
            for rec in stamped:
                self._overlay[str(rec["id"])] = rec

    def _begin(self, video_id: str) -> None:
        """Announce a change of ``video_id``: until its closing record, the group is the truth."""
        self._log([{"id": video_id, "op": "pending"}])

    def _resolve(self, ids: list[str]) -> list[dict[str, Any]]:
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

    def _listing(self) -> list[str]:
        """The names of the per-video groups (unsorted; a list: hashing 240,000 names into a set
        costs as much as listing them)."""
        return [n for n in self._files.list("videos") if n != "zarr.json" and n[:1] != "."]

    def _load_index(self) -> IndexTable:
        """Merge the index parts, then reconcile them with the groups: videos whose last record is
        pending, and groups the index does not know, are read from their groups; indexed videos
        whose group is gone are dropped. A store without an index gets one built."""
        found = read_index(self._files)
        listed = self._listing()
        if found is None:
            if listed:
                log.info(
                    "store %s has no metadata index: building it from %d video groups",
                    self.path,
                    len(listed),
                )
            table = IndexTable.empty()
        else:
            table = found[0]
        live_ids = table.ids[table.op == PUT]
        pending = table.ids[table.op == PENDING].tolist()
        names = np.array(listed, dtype=str)
        names.sort()
        if not pending and np.array_equal(names, live_ids):
            unknown: list[str] = []  # the usual case, checked in C: index and groups agree
            gone: set[str] = set()
        else:
            listing = set(listed)
            known = set(live_ids.tolist())
            unknown = sorted((listing - known) | set(pending))
            gone = known - listing
        if gone:
            log.warning(
                "store %s: %d indexed videos have no group (e.g. %r); dropped from the view",
                self.path,
                len(gone),
                sorted(gone)[0],
            )
        if len(unknown) > 1000:
            log.info("store %s: reading %d video groups into the index", self.path, len(unknown))
        resolved = self._resolve(unknown)
        if resolved and self.mode != "r":
            self._index_writer().append(resolved)
            if found is None and len(resolved) >= ROLL:
                compact(self._files)
        if self.mode != "r" and found is None:
            self._ensure_index_group()
        merged = latest(concat([table, IndexTable.from_records(resolved)]))
        keep = merged.op == PUT
        if gone:
            keep &= ~np.isin(merged.ids, np.array(sorted(gone), dtype=str))
        return merged.take(np.flatnonzero(keep))

    def _ensure_index_group(self) -> None:
        if "index" not in self._root:
            with contextlib.suppress(ContainsGroupError):  # another writer created it meanwhile
                self._root.create_group(
                    "index",
                    attributes={"format": INDEX_FORMAT, "about": "framepool metadata index"},
                )

    def _view(self) -> IndexTable:
        """The index as this store sees it: one row per video (sorted by id), own writes
        included. Loaded on first use; :meth:`refresh` reloads it (other writers' changes)."""
        with self._lock:
            if self._table is None:
                self._table = self._load_index()
                self._rows = None
            if self._overlay:
                recs = list(self._overlay.values())
                pending = [str(r["id"]) for r in recs if r.get("op") == "pending"]
                if pending:
                    done = {str(r["id"]): r for r in self._resolve(pending)}
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

    def _record(self, video_id: str) -> dict[str, Any] | None:
        """The index record of one video (None when absent); no full view rebuild."""
        with self._lock:
            rec = self._overlay.get(video_id)
            if rec is not None:
                if rec.get("op") == "pending":
                    rec = self._resolve([video_id])[0]
                return rec if rec.get("op") == "put" else None
            if self._table is None:
                self._view()
            assert self._table is not None
            if self._rows is None:
                self._rows = {v: i for i, v in enumerate(self._table.ids.tolist())}
            row = self._rows.get(video_id)
            return None if row is None else self._table.record(row)

    def index_table(self, status: str | None = "complete") -> IndexTable:
        """The metadata index as columns (:class:`storage.index.IndexTable`), one row per video
        with ``status`` (None: any), sorted by id."""
        table = self._view()
        if status is None:
            return table
        return table.take(np.flatnonzero(table.text["status"] == status))

    def reindex(self) -> dict[str, int]:
        """Rebuild the index from the per-video groups and replace every index file with it.

        Run it when no other process is writing to the store (records they append to a part
        that existed before the rebuild would be dropped with it).
        """
        self._writable()
        self._ensure_index_group()
        before = [
            n for n in self._files.list(INDEX_DIR) if n.endswith(".jsonl") or n.endswith(".npz")
        ]
        ids = sorted(self._listing())
        resolved = self._resolve(ids)
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
        if video_id != safe_video_id(video_id):
            raise ValueError(f"video id {video_id!r} is not safe; use storage.safe_video_id")
        if not streams:
            raise ValueError(f"video {video_id!r}: no streams given")
        arrays: dict[str, np.ndarray] = {}
        lengths = set()
        for name, arr in streams.items():
            if not name or name != safe_video_id(name):
                raise ValueError(f"video {video_id!r}: invalid stream name {name!r}")
            a = np.asarray(arr)
            if a.ndim not in (2, 4) or min(a.shape) < 1:
                raise ValueError(
                    f"video {video_id!r}, stream {name!r}: expected a [T, d] array with T, d >= 1 "
                    f"(or a [T', h, w, C] map), got shape {a.shape}"
                )
            if not np.issubdtype(a.dtype, np.number):
                raise ValueError(
                    f"video {video_id!r}, stream {name!r}: dtype {a.dtype} is not numeric"
                )
            with np.errstate(over="ignore", invalid="ignore"):
                a16 = a.astype(np.float16)
            if not np.isfinite(a16).all():
                raise ValueError(
                    f"video {video_id!r}, stream {name!r}: features contain NaN or values beyond "
                    "float16 range"
                )
            arrays[name] = a16
            if a.ndim == 2:  # maps may be kept at a frame stride: their T' is their own
                lengths.add(a.shape[0])
        if len(lengths) > 1:
            shapes = {k: v.shape for k, v in arrays.items()}
            raise ValueError(f"video {video_id!r}: streams differ in T: {shapes}")
        if not overwrite:
            current = self._record(video_id)
            if current is not None and current.get("status") == "complete":
                raise FileExistsError(f"video {video_id!r} is already complete in {self.path!r}")

        attrs: dict[str, Any] = {
            "label": label,
            "split": split,
            **({"group": str(group)} if group is not None else {}),
            **_jsonable(dict(meta or {})),
            "status": "incomplete",
            "streams": sorted(arrays),
        }
        self._begin(video_id)
        # The group is (re)created "incomplete"; only its last write below marks it complete.
        self._clear_group(video_id)
        write_group(self._files, video_id, attrs)
        shapes_out = {}
        for name, a16 in arrays.items():
            rows = write_stream(self._files, video_id, name, a16)
            # map streams [T', h, w, C] are read through Zarr (rows -1); the index keeps T' and C
            direct = rows if a16.ndim == 2 else -1
            shapes_out[name] = [int(a16.shape[0]), int(a16.shape[-1]), direct]
        done = {"status": "complete", "error": None, "extracted_at": _now()}
        write_group(self._files, video_id, {**attrs, **done})  # one write: status, error, time
        self._log([_index_record(video_id, {**attrs, **done}, shapes_out)])

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
            "label": label,
            "split": split,
            **({"group": str(group)} if group is not None else {}),
            **_jsonable(dict(meta or {})),
            "status": "failed",
            "error": str(error),
            "extracted_at": _now(),
            "streams": [],
        }
        self._begin(video_id)
        self._clear_group(video_id)
        write_group(self._files, video_id, _jsonable(attrs))
        self._log([_index_record(video_id, attrs, {})])

    def mark_damaged(self, video_id: str, reason: str) -> None:
        """Mark a stored video ``incomplete`` because its data is damaged, so that the next
        ``extract`` redoes it; the reason is kept in its ``error``."""
        self._writable()
        attrs = self._group_attrs(video_id)
        self._begin(video_id)
        attrs.update(status="incomplete", error=f"damaged: {reason}")
        write_group(self._files, video_id, attrs)
        self._log([record_from_group(self._files, video_id)])

    def delete_video(self, video_id: str) -> None:
        self._writable()
        if self._files.list(f"videos/{video_id}"):
            self._begin(video_id)
            self._files.remove_tree(f"videos/{video_id}")
            self._log([{"id": video_id, "op": "del"}])

    def status(self, video_id: str) -> str | None:
        """``complete``, ``failed``, ``incomplete``, or None when the video is absent."""
        rec = self._record(video_id)
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
        self._begin(video_id)
        write_group(self._files, video_id, {**current, **_jsonable(attrs)})
        self._log([record_from_group(self._files, video_id)])

    def _shapes(self, video_id: str) -> dict[str, list[int]]:
        rec = self._record(video_id)
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
        rec = self._record(video_id)
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
        ids = self.videos()
        done = [0]
        lock = threading.Lock()

        def check(vid: str) -> dict[str, str] | None:
            try:
                for stream in self.streams(vid):
                    self.read(vid, stream, np.float16)
                    if int(self._shapes(vid)[stream][2]) <= 0:
                        _check_chunk_count(self._files, vid, stream, self.path)
            except CorruptVideoError as exc:
                return {"video_id": vid, "key": exc.key, "error": str(exc)}
            finally:
                with lock:
                    done[0] += 1
                    if progress is not None:
                        progress(done[0])
            return None

        with ThreadPoolExecutor(max(1, min(workers, len(ids) or 1))) as pool:
            damaged = [r for r in pool.map(check, ids) if r is not None]
        if mark and damaged:
            self._writable()
            for r in damaged:
                self.mark_damaged(r["video_id"], f"{r['key']}: {r['error']}")
        return damaged

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
        table = self._view()
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

    def groups(self, video_ids: list[str]) -> list[str | None]:
        """Groups of ``video_ids`` from the index (None for a video without one; see
        :meth:`write_video`); KeyError naming the first video that is not in the store."""
        table = self._view()
        rows = self._row_map(table)
        column = table.text.get("group")
        out: list[str | None] = []
        for vid in video_ids:
            row = rows.get(vid)
            if row is None:
                raise KeyError(f"video {vid!r} is not in store {self.path!r}")
            value = None if column is None else column[row]
            out.append(None if value is None else str(value))
        return out

    def _row_map(self, table: IndexTable) -> dict[str, int]:
        with self._lock:
            if self._rows is None:
                self._rows = {v: i for i, v in enumerate(table.ids.tolist())}
            return self._rows

    def labels(self, video_ids: list[str]) -> list[str]:
        """Labels of ``video_ids`` from the index; ValueError naming the first video without
        one, KeyError naming the first that is not in the store."""
        table = self._view()
        rows = self._row_map(table)
        labels = table.text["label"]
        out = []
        for vid in video_ids:
            row = rows.get(vid)
            if row is None:
                raise KeyError(f"video {vid!r} is not in store {self.path!r}")
            label = labels[row]
            if label is None:
                raise ValueError(f"video {vid!r} in {self.path!r} has no label")
            out.append(str(label))
        return out

    # ------------------------------------------------------------------ splits
    def split_lists(self) -> dict[str, dict[str, list[str]]]:
        """Named split lists ``{name: {part: [video_id, ...]}}`` (:meth:`set_split_list`)."""
        recorded = dict(_attr(self._root["splits"], "lists", {})) if "splits" in self._root else {}
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
        """Arrays and attrs cached under ``/cache/<name>/<key>``, or None when absent/incomplete."""
        path = f"cache/{name}/{key}"
        try:
            grp = self._root[path]
        except KeyError:
            return None
        if not isinstance(grp, zarr.Group) or not grp.attrs.get("complete"):
            return None
        out: dict[str, Any] = {"attrs": dict(grp.attrs)}
        for arr_name, arr in grp.arrays():
            out[arr_name] = arr
        return out

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
        parent = self._root.require_group(f"cache/{name}")
        for old in list(parent.group_keys()):
            if old != key:
                del parent[old]
        grp = parent.create_group(
            key, overwrite=True, attributes={**_jsonable(dict(attrs or {})), "complete": False}
        )
        arrays = {}
        for arr_name, (shape, dtype, chunks) in shapes.items():
            if raw:
                floating = np.issubdtype(np.dtype(dtype), np.floating)
                arrays[arr_name] = grp.create_array(
                    name=arr_name,
                    shape=shape,
                    dtype=dtype,
                    chunks=chunks,
                    fill_value=np.nan if floating else 0,
                    serializer=BytesCodec(endian="little"),
                    compressors=[Crc32cCodec()],
                )
            else:
                arrays[arr_name] = grp.create_array(
                    name=arr_name, shape=shape, dtype=dtype, chunks=chunks
                )
        return arrays

    def finish_cache(self, name: str, key: str) -> None:
        grp = self._root[f"cache/{name}/{key}"]
        grp.attrs.update({"complete": True, "created_at": _now()})

    # ------------------------------------------------------------------ summary
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: counts by status, split and class, streams and dims, failures.
        Answered from the index."""
        table = self._view()
        status_col = table.text["status"]
        by_status: dict[str, int] = {s: 0 for s in STATUSES}
        for status, n in Counter(status_col.tolist()).items():
            key = str(status or "incomplete")
            by_status[key] = by_status.get(key, 0) + n
        complete = status_col == "complete"
        by_split = Counter(table.text["split"][complete].tolist())  # counted in C, then
        by_class = Counter(table.text["label"][complete].tolist())  # the unset (None) dropped
        by_split.pop(None, None)
        by_class.pop(None, None)
        stream_dims: dict[str, int] = {}
        frames = np.zeros(int(complete.sum()), dtype=np.int64)
        for s in table.streams:
            dims = table.ints[f"d/{s}"][complete]
            held = dims >= 0
            if held.any():
                stream_dims[s] = int(dims[held][0])
                frames = np.maximum(frames, table.ints[f"T/{s}"][complete])
        failed = np.flatnonzero(status_col == "failed")
        failures = [
            {"video_id": str(table.ids[i]), "error": str(table.text["error"][i])} for i in failed
        ]
        attrs = self.attrs
        return {
            "path": self.path,
            "schema_version": attrs.get("schema_version"),
            "created_by": attrs.get("created_by"),
            "n_videos": sum(by_status.values()),
            "status": by_status,
            "total_frames": int(frames.sum()),
            "streams": dict(sorted(stream_dims.items())),
            "class_names": self.class_names,
            "videos_per_class": dict(sorted(by_class.items())),
            "videos_per_split": dict(sorted(by_split.items())),
            "split_lists": {
                n: {p: len(ids) for p, ids in parts.items()}
                for n, parts in self.split_lists().items()
            },
            "extractor": attrs.get("extractor", {}),
            "failed": failures,
        }
