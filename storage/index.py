"""The store's metadata index: one table of every video, kept beside the per-video groups.

Why: listing a store through Zarr reads one ``zarr.json`` per video (about 1 ms each, 4 minutes at
Kinetics scale); the index answers listing, labels, splits, class names and ``info()`` from a few
files.

Layout, under ``/index`` (a Zarr group, so that plain Zarr sees a valid hierarchy)::

    <writer>-<seq>.jsonl   a live part: one JSON record per line, appended by one writer only
    <writer>-<seq>.npz     the same part frozen into columns once it holds ROLL records
    base-<stamp>.npz       a compacted table (written by ``compact`` and ``reindex``)
    classes-<stamp>.json   class names declared by one ``FeatureStore.create`` (a JSON list)

Every writer (a ``FeatureStore`` opened for writing, in any process or machine) appends to its own
part, so many writers never write the same file. A record is ``put`` (the video's metadata),
``del`` (deleted) or ``pending`` (a change is under way: the group is the truth until the matching
``put``/``del``). Readers merge every part and keep the newest record of each video (by the
record's nanosecond time, then its writer's sequence). Frozen parts and bases are immutable, so
``compact`` can merge them while writers keep appending to their live parts.

Declared class names follow the same rule: every declaration is a new immutable file, readers
take the union of all of them, and merging several into one writes the union before removing
what it merged, so a name is never lost to two writers declaring at once (no file is ever read,
changed and written back, which object storage could not do safely without locks).

Record columns: id, op, t, status, label, split, group, error, extracted_at, source, source_sha256,
n_frames, and per stream ``T/<stream>`` (frames), ``d/<stream>`` (feature size) and ``r/<stream>``
(rows per chunk when the array has the store's own layout, see :mod:`storage.layout`); -1 for
absent. A record's ``shapes`` maps a stream to ``[T, d, r]``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.files import Files

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FORMAT = 1
ROLL = 1024  # records in a live part before it is frozen into columns
MAX_FROZEN = 8  # frozen parts beyond which a writer compacts them into one base
CLASSES = "classes-"  # prefix of the files of declared class names
MAX_CLASS_FILES = 8  # class-name files beyond which a declaration merges them into one

OPS = ("put", "del", "pending")
PUT, DEL, PENDING = 0, 1, 2
TEXT_FIELDS = (
    "status",
    "label",
    "split",
    "group",
    "error",
    "extracted_at",
    "source",
    "source_sha256",
)
INT_FIELDS = ("n_frames",)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


@dataclass
class IndexTable:
    """Columns of video records: ``ids`` (unicode), ``op`` (int8), ``t`` (int64 ns), ``text``
    columns (object arrays of str or None) and ``ints`` columns (int64, -1 when absent)."""

    ids: np.ndarray
    op: np.ndarray
    t: np.ndarray
    text: dict[str, np.ndarray]
    ints: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls) -> IndexTable:
        return cls.from_records([])

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> IndexTable:
        """Columns of JSON records (see the module docstring for their fields)."""
        n = len(records)
        text = {f: np.array([_text(r.get(f)) for r in records], dtype=object) for f in TEXT_FIELDS}
        ints = {f: np.array([_int(r.get(f)) for r in records], dtype=np.int64) for f in INT_FIELDS}
        streams = sorted({s for r in records for s in (r.get("shapes") or {})})
        for s in streams:
            shapes = [(r.get("shapes") or {}).get(s) for r in records]
            ints[f"T/{s}"] = np.array([-1 if v is None else int(v[0]) for v in shapes], np.int64)
            ints[f"d/{s}"] = np.array([-1 if v is None else int(v[1]) for v in shapes], np.int64)
            ints[f"r/{s}"] = np.array(
                [-1 if v is None or len(v) < 3 else int(v[2]) for v in shapes], np.int64
            )
        for col in text.values():
            col.shape = (n,)
        return cls(
            ids=np.array([str(r["id"]) for r in records], dtype=str).reshape(n),
            op=np.array([OPS.index(r.get("op", "put")) for r in records], dtype=np.int8),
            t=np.array([int(r.get("t", 0)) for r in records], dtype=np.int64),
            text=text,
            ints=ints,
        )

    @property
    def streams(self) -> list[str]:
        return sorted(k[2:] for k in self.ints if k.startswith("T/"))

    def take(self, rows: np.ndarray) -> IndexTable:
        return IndexTable(
            self.ids[rows],
            self.op[rows],
            self.t[rows],
            {k: v[rows] for k, v in self.text.items()},
            {k: v[rows] for k, v in self.ints.items()},
        )

    def record(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a record (the fields of the module docstring)."""
        rec: dict[str, Any] = {"id": str(self.ids[i]), "op": OPS[int(self.op[i])]}
        rec["t"] = int(self.t[i])
        for f, col in self.text.items():
            rec[f] = col[i]
        for f in INT_FIELDS:
            value = int(self.ints[f][i]) if f in self.ints else -1
            rec[f] = None if value < 0 else value
        rec["shapes"] = {
            s: [int(self.ints[f"{c}/{s}"][i]) if f"{c}/{s}" in self.ints else -1 for c in "Tdr"]
            for s in self.streams
            if self.ints[f"T/{s}"][i] >= 0
        }
        return rec

    # ------------------------------------------------------------------ bytes
    def to_npz(self) -> bytes:
        """The table as an uncompressed ``.npz`` (strings dictionary-encoded, no pickles)."""
        arrays: dict[str, np.ndarray] = {"ids": self.ids, "op": self.op, "t": self.t}
        for f, col in self.text.items():
            present = np.array([v is not None for v in col], dtype=bool)
            values = np.array([v for v in col if v is not None], dtype=str)
            uniq, inverse = np.unique(values, return_inverse=True)
            codes = np.full(len(col), -1, dtype=np.int32)
            codes[present] = inverse
            arrays[f"text.{f}.values"] = uniq
            arrays[f"text.{f}.codes"] = codes
        for f, icol in self.ints.items():
            arrays[f"int.{f}"] = icol
        arrays["format"] = np.array([INDEX_FORMAT])
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> IndexTable:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if int(z["format"][0]) > INDEX_FORMAT:
                raise ValueError(f"index format {int(z['format'][0])} is newer than this framepool")
            text, ints = {}, {}
            for key in z.files:
                if key.startswith("text.") and key.endswith(".codes"):
                    f = key[len("text.") : -len(".codes")]
                    lookup = np.empty(len(z[f"text.{f}.values"]) + 1, dtype=object)
                    lookup[:-1] = z[f"text.{f}.values"]
                    text[f] = lookup[z[key]]  # code -1 picks the trailing None
                elif key.startswith("int."):
                    ints[key[len("int.") :]] = z[key]
            return cls(z["ids"], z["op"], z["t"], text, ints)


def concat(tables: Sequence[IndexTable]) -> IndexTable:
    """Rows of all ``tables`` (columns missing from some filled with None / -1)."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return IndexTable.empty()
    if len(tables) == 1:
        return tables[0]
    text_keys = sorted({k for t in tables for k in t.text})
    int_keys = sorted({k for t in tables for k in t.ints})

    def text_col(t: IndexTable, k: str) -> np.ndarray:
        return t.text[k] if k in t.text else np.full(len(t), None, dtype=object)

    def int_col(t: IndexTable, k: str) -> np.ndarray:
        return t.ints[k] if k in t.ints else np.full(len(t), -1, dtype=np.int64)

    return IndexTable(
        np.concatenate([t.ids for t in tables]),
        np.concatenate([t.op for t in tables]),
        np.concatenate([t.t for t in tables]),
        {k: np.concatenate([text_col(t, k) for t in tables]) for k in text_keys},
        {k: np.concatenate([int_col(t, k) for t in tables]) for k in int_keys},
    )


def latest(table: IndexTable) -> IndexTable:
    """The newest record of every video, sorted by id (ties in time: the later row wins)."""
    n = len(table)
    if n == 0:
        return table
    ids = table.ids
    if n == 1 or bool((ids[1:] > ids[:-1]).all()):
        return table  # already one row per id, in order
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if bool((sorted_ids[1:] != sorted_ids[:-1]).all()):
        return table.take(order)  # one row per id (e.g. disjoint bases of several writers)
    order = np.lexsort((np.arange(n), table.t, ids))
    sorted_ids = ids[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    return table.take(order[last])


# ---------------------------------------------------------------------------------- reading
def _parse_part(data: bytes, name: str) -> list[dict[str, Any]]:
    body = data.strip()
    if body:
        try:  # one decoder call for the whole part (a torn last line falls back to line by line)
            whole = json.loads(b"[" + body.replace(b"\n", b",") + b"]")
            return [r for r in whole if isinstance(r, dict) and "id" in r]
        except ValueError:
            pass
    records = []
    lines = data.split(b"\n")
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            # a writer killed mid-line leaves a torn last line: that change is still pending
            # (its group is the truth), so the line is skipped
            if k < len(lines) - 1 and any(rest.strip() for rest in lines[k + 1 :]):
                log.warning("index part %s: skipping an unreadable line %d", name, k + 1)
            continue
        if isinstance(rec, dict) and "id" in rec:
            records.append(rec)
    return records


def read_index(files: Files) -> tuple[IndexTable, list[str]] | None:
    """The merged index (newest record per video, pending and deleted included) and the file
    names it came from; None when the store has no index yet.

    Writers freeze and compact parts meanwhile, so a listed file may be gone when it is read;
    whatever replaced it (a frozen part, a base) was written before it was removed, so the
    folder is listed again and only the files not read yet are read. What was read stays valid
    (frozen parts and bases never change; a record read twice is the same record)."""
    tables: list[IndexTable] = []
    records: list[dict[str, Any]] = []
    read: set[str] = set()
    for _attempt in range(100):
        names = sorted(files.list(INDEX_DIR))
        frozen = {n[: -len(".npz")] for n in names if n.endswith(".npz")}
        parts = [n for n in names if n.endswith(".jsonl") and n[: -len(".jsonl")] not in frozen]
        npz = [n for n in names if n.endswith(".npz")]
        if _attempt == 0 and "zarr.json" not in names and not npz and not parts:
            return None
        vanished = False
        for name in npz + parts:
            if name in read:
                continue
            data = files.read(f"{INDEX_DIR}/{name}")
            if data is None:  # frozen or compacted away meanwhile: its successor is listed next
                vanished = True
                continue
            read.add(name)
            if name.endswith(".npz"):
                tables.append(IndexTable.from_npz(data))
            else:
                records.extend(_parse_part(data, name))
        if not vanished:
            tables.append(IndexTable.from_records(records))
            return latest(concat(tables)), npz + parts
    raise OSError(f"the index of {files.url!r} kept changing while it was read; try again")


# ---------------------------------------------------------------------------------- writing
class IndexWriter:
    """Appends this writer's records to its own part files (thread-safe)."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.seq = 0
        self.buffer: list[dict[str, Any]] = []  # records of the live part
        self.last_t = 0
        self.lock = threading.Lock()

    def _part(self) -> str:
        return f"{INDEX_DIR}/{self.name}-{self.seq:06d}"

    def stamp(self) -> int:
        """A nanosecond time, strictly increasing for this writer."""
        with self.lock:
            self.last_t = max(time.time_ns(), self.last_t + 1)
            return self.last_t

    def append(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append ``records`` (stamped with a time when they carry none); returns them stamped."""
        recs = [dict(r) for r in records]
        if not recs:
            return recs
        with self.lock:
            for r in recs:
                if "t" not in r:
                    self.last_t = max(time.time_ns(), self.last_t + 1)
                    r["t"] = self.last_t
            data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs)
            self.files.append(self._part() + ".jsonl", data.encode())
            self.buffer.extend(recs)
            if len(self.buffer) >= ROLL:
                self._freeze()
        return recs

    def close(self) -> None:
        """Freeze the live part (readers then load columns, not JSON) and compact the frozen
        parts when there are several. Called when the writing store is closed or collected,
        and at interpreter exit."""
        with self.lock:
            if self.buffer:
                self._freeze()
            if sum(n.endswith(".npz") for n in self.files.list(INDEX_DIR)) > 1:
                compact(self.files)  # readers then load one file, already in id order

    def _freeze(self) -> None:
        table = latest(IndexTable.from_records(self.buffer))
        self.files.write(self._part() + ".npz", table.to_npz())
        self.files.remove(self._part() + ".jsonl")
        self.buffer = []
        self.seq += 1
        names = self.files.list(INDEX_DIR)
        if sum(n.endswith(".npz") for n in names) > MAX_FROZEN:
            compact(self.files)


def compact(files: Files) -> int:
    """Merge every frozen part and base into one new base; returns the records it holds.

    Safe while writers append: live parts are left alone, and only files merged into the new
    base are removed (each is immutable once written).
    """
    names = sorted(n for n in files.list(INDEX_DIR) if n.endswith(".npz"))
    if len(names) <= 1:
        return 0
    tables = []
    merged = []
    for name in names:
        data = files.read(f"{INDEX_DIR}/{name}")
        if data is not None:
            tables.append(IndexTable.from_npz(data))
            merged.append(name)
    table = latest(concat(tables))
    write_base(files, table)
    for name in merged:
        files.remove(f"{INDEX_DIR}/{name}")
    return len(table)


def write_base(files: Files, table: IndexTable) -> str:
    name = f"base-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.npz"
    files.write(f"{INDEX_DIR}/{name}", table.to_npz())
    return name


# ---------------------------------------------------------------------------------- class names
def _class_files(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.startswith(CLASSES) and n.endswith(".json"))


def declare_class_names(files: Files, names: Iterable[str]) -> None:
    """Record ``names`` as class names of the store in a new file of their own (merging the
    class-name files into one when there are more than ``MAX_CLASS_FILES``)."""
    wanted = sorted({str(n) for n in names})
    if not wanted:
        return
    _write_class_file(files, wanted)
    if len(_class_files(files.list(INDEX_DIR))) > MAX_CLASS_FILES:
        compact_class_names(files)


def _write_class_file(files: Files, names: list[str]) -> None:
    name = f"{CLASSES}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    files.write(f"{INDEX_DIR}/{name}", json.dumps(names).encode())


def read_index_json(files: Files, name: str, expected: type, what: str) -> Any:
    """The JSON document ``/index/<name>`` (None when it vanished while listed); ValueError
    naming the file when it is not JSON or not of the ``expected`` type (``what`` says which)."""
    data = files.read(f"{INDEX_DIR}/{name}")
    if data is None:
        return None
    kind = "class-name file" if expected is list else "declaration file"
    try:
        value = json.loads(data)
    except ValueError:
        raise ValueError(f"{kind} {INDEX_DIR}/{name} of {files.url!r} is not valid JSON") from None
    if not isinstance(value, expected):
        raise ValueError(
            f"{kind} {INDEX_DIR}/{name} of {files.url!r} holds {type(value).__name__}, not {what}"
        )
    return value


def _read_class_files(files: Files) -> tuple[set[str], list[str]]:
    """The union of every class-name file and the files it came from. A file merged away while
    it is listed is replaced by its merge, written before it was removed: listed next round."""
    names: set[str] = set()
    read: list[str] = []
    for _attempt in range(100):
        vanished = False
        for name in _class_files(files.list(INDEX_DIR)):
            if name in read:
                continue
            values = read_index_json(files, name, list, "a list of names")
            if values is None:
                vanished = True
                continue
            names.update(str(v) for v in values)
            read.append(name)
        if not vanished:
            return names, read
    raise OSError(f"the class names of {files.url!r} kept changing while read; try again")


def read_class_names(files: Files) -> set[str]:
    """Every class name declared in the store (the union of its class-name files)."""
    return _read_class_files(files)[0]


def compact_class_names(files: Files) -> None:
    """Merge the class-name files into one: the union is written before any merged file is
    removed, so concurrent readers, declarers and compactors never lose a name."""
    names, merged = _read_class_files(files)
    if len(merged) <= 1:
        return
    _write_class_file(files, sorted(names))
    for name in merged:
        files.remove(f"{INDEX_DIR}/{name}")
