"""How a stream array is laid out, how to read it fast, and how damage shows.

Every stream array is a plain Zarr v3 float16 array ``[T, d]`` chunked by rows, with the codecs
``bytes`` (little endian) -> ``zstd`` -> ``crc32c`` and fill value NaN. Why these:

- **NaN fill value.** A chunk file that is missing reads back as the fill value. With 0 it looked
  like real (if dull) features and training went on; NaN can never be a stored feature (writes
  refuse NaN), so a missing chunk is detectable in the data itself, by any Zarr reader and at no
  cost on write. It also keeps Zarr from skipping an all-zero chunk on write (Zarr does not store
  chunks equal to the fill value), which with fill 0 made a legitimately zero chunk
  indistinguishable from a lost one.
- **crc32c per chunk.** A truncated or bit-flipped chunk must not decode into plausible numbers;
  the checksum catches any change of its bytes (a 4-byte trailer, ~1 GB/s).
- A chunk-count check (listing the chunk files) would cost a listing per video on every read and
  catch only missing files, so it is used only for arrays written before this layout (``verify``).

Because the layout is fixed, a video is written and read as plain files: :func:`write_group` and
:func:`write_stream` write the Zarr v3 documents (``zarr.json``) and encoded chunks that Zarr itself
would write (tests read them back through Zarr), and :func:`read_direct` reads a stream with one
file read per chunk and no metadata round trip (the index records T, d and the rows per chunk).
Through Zarr's API each node operation costs a synchronised event-loop round trip (six per
written video); plain files avoid them, both ways. Arrays with any other layout are read through
Zarr.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd

from storage.files import Files
from storage.ids import safe_video_id

CHUNK_BYTES = 1 << 20  # about 1 MiB of float16 per chunk
_ZSTD = Zstd()
_CODECS = [
    {"name": "bytes", "configuration": {"endian": "little"}},
    {"name": "zstd", "configuration": {"level": 0, "checksum": False}},
    {"name": "crc32c"},
]


class CorruptVideoError(ValueError):
    """A complete video whose stored features cannot be read back as written."""

    def __init__(self, message: str, video_id: str, key: str) -> None:
        super().__init__(message)
        self.video_id = video_id
        self.key = key


def chunk_rows(t: int, d: int) -> int:
    return max(1, min(t, CHUNK_BYTES // (2 * d)))


def _group_doc(attrs: dict[str, Any]) -> bytes:
    doc = {"attributes": attrs, "zarr_format": 3, "node_type": "group"}
    return json.dumps(doc, indent=2, allow_nan=False).encode()


def _array_doc(shape: tuple[int, ...], rows: int) -> bytes:
    doc = {
        "shape": list(shape),
        "data_type": "float16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows, *shape[1:]]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": "NaN",
        "codecs": _CODECS,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    return json.dumps(doc, indent=2).encode()


def encode_chunk(block: np.ndarray) -> bytes:
    """One chunk's bytes: little-endian float16, zstd, then its crc32c (4 bytes, little endian)."""
    body = bytes(_ZSTD.encode(np.ascontiguousarray(block, dtype="<f2")))
    return body + np.uint32(google_crc32c.value(body)).tobytes()


def write_group(files: Files, video_id: str, attrs: dict[str, Any]) -> None:
    """Write (or replace, in one write) the group document of ``videos/<video_id>``."""
    files.write(f"videos/{video_id}/zarr.json", _group_doc(attrs))


def write_stream(files: Files, video_id: str, name: str, a16: np.ndarray) -> int:
    """Write ``a16`` float16 (``[T, d]``, or ``[T', h, w, C]`` for a map stream) as the array
    ``videos/<video_id>/<name>`` (chunks of whole rows first, then its document); returns the
    rows per chunk."""
    t, rest = int(a16.shape[0]), tuple(int(x) for x in a16.shape[1:])
    rows = chunk_rows(t, int(np.prod(rest)))
    for i, start in enumerate(range(0, t, rows)):
        block = a16[start : start + rows]
        if len(block) < rows:  # Zarr stores edge chunks whole, padded with the fill value
            pad = np.full((rows - len(block), *rest), np.nan, np.float16)
            block = np.concatenate([block, pad])
        key = "/".join(["c", str(i)] + ["0"] * len(rest))
        files.put(f"videos/{video_id}/{name}/{key}", encode_chunk(block))
    files.put(f"videos/{video_id}/{name}/zarr.json", _array_doc((t, *rest), rows))
    return rows


def direct_rows(meta: dict[str, Any]) -> int:
    """Rows per chunk of an array (its ``zarr.json`` as a dict) in the layout above, else -1."""
    try:
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        encoding = meta.get("chunk_key_encoding", {})
        if (
            meta.get("data_type") == "float16"
            and meta.get("codecs") == _CODECS
            and encoding.get("name") == "default"
            and encoding.get("configuration", {}).get("separator", "/") == "/"
            and len(grid) == 2
            and int(grid[1]) == int(meta["shape"][1])
        ):
            return int(grid[0])
    except (KeyError, TypeError, ValueError, IndexError):
        pass
    return -1


def _decode(raw: bytes, rows: int, d: int) -> np.ndarray:
    if len(raw) < 4:
        raise ValueError(f"{len(raw)} bytes, shorter than its checksum")
    body, trailer = raw[:-4], raw[-4:]
    if np.uint32(google_crc32c.value(body)).tobytes() != trailer:
        raise ValueError("checksum mismatch (truncated or altered)")
    data = _ZSTD.decode(body)
    if len(data) != rows * d * 2:
        raise ValueError(f"decodes to {len(data)} bytes, expected {rows * d * 2}")
    return np.frombuffer(data, dtype="<f2").reshape(rows, d)


def read_direct(
    files: Files, video_id: str, stream: str, t: int, d: int, rows: int, where: str
) -> np.ndarray:
    """``[t, d]`` float16 of a stream in the layout above, one file read per chunk."""
    n_chunks = -(-t // rows)
    parts = []
    for i in range(n_chunks):
        key = f"videos/{video_id}/{stream}/c/{i}/0"
        raw = files.read(key)
        if raw is None:
            raise CorruptVideoError(
                f"video {video_id!r} in {where!r} is damaged: chunk file {key!r} of stream "
                f"{stream!r} is missing; run `framepool store verify` and re-extract it",
                video_id,
                key,
            )
        try:
            parts.append(_decode(raw, rows, d))
        except Exception as exc:
            raise CorruptVideoError(
                f"video {video_id!r} in {where!r} is damaged: chunk file {key!r} of stream "
                f"{stream!r} cannot be decoded ({exc}); run `framepool store verify` and "
                "re-extract it",
                video_id,
                key,
            ) from None
    out = parts[0] if n_chunks == 1 else np.concatenate(parts)
    return out[:t]


def read_zarr(root: zarr.Group, video_id: str, stream: str, where: str) -> np.ndarray:
    """A stream in any layout, through Zarr; damage (undecodable or missing chunks) raises."""
    path = f"videos/{video_id}/{stream}"
    try:
        arr = root[path]
        assert isinstance(arr, zarr.Array)
        data = np.asarray(arr[...])
    except Exception as exc:
        raise CorruptVideoError(
            f"video {video_id!r} in {where!r} is damaged: stream array {path!r} cannot be read "
            f"({type(exc).__name__}: {exc}); run `framepool store verify` and re-extract it",
            video_id,
            path,
        ) from None
    if np.issubdtype(data.dtype, np.floating):
        bad = np.flatnonzero(np.isnan(data).any(axis=tuple(range(1, data.ndim))))
        if len(bad):
            rows = int(arr.chunks[0])
            key = f"{path}/c/{int(bad[0]) // rows}/0"
            raise CorruptVideoError(
                f"video {video_id!r} in {where!r} is damaged: chunk file {key!r} of stream "
                f"{stream!r} is missing (rows read back as the NaN fill value); run "
                "`framepool store verify` and re-extract it",
                video_id,
                key,
            )
    return data


def record_from_group(files: Files, video_id: str) -> dict[str, Any]:
    """An index record of ``video_id`` read from its group's ``zarr.json`` files (``op`` is
    ``del`` when the group is gone; an unreadable group is ``incomplete`` with the reason)."""
    raw = files.read(f"videos/{video_id}/zarr.json")
    if raw is None:
        return {"id": video_id, "op": "del"}
    try:
        attrs = json.loads(raw).get("attributes") or {}
    except ValueError as exc:
        return {
            "id": video_id,
            "op": "put",
            "status": "incomplete",
            "error": f"damaged: unreadable group metadata ({exc})",
        }
    rec: dict[str, Any] = {
        "id": video_id,
        "op": "put",
        **{k: attrs.get(k) for k in ("label", "split", "group", "error", "extracted_at", "source")},
        "source_sha256": attrs.get("source_sha256"),
        "n_frames": attrs.get("n_frames"),
        "status": attrs.get("status", "incomplete"),
    }
    shapes: dict[str, list[int]] = {}
    if rec["status"] == "complete":
        for stream in attrs.get("streams") or files.list(f"videos/{video_id}"):
            meta_raw = files.read(f"videos/{video_id}/{stream}/zarr.json")
            if meta_raw is None:
                continue
            try:
                meta = json.loads(meta_raw)
                if meta.get("node_type") != "array" or len(meta["shape"]) < 2:
                    continue
                # a map stream [T', h, w, C] is indexed by its T' and C
                t, d = int(meta["shape"][0]), int(meta["shape"][-1])
            except (ValueError, KeyError, TypeError):
                rec.update(status="incomplete", error=f"damaged: unreadable {stream!r} metadata")
                continue
            shapes[stream] = [t, d, direct_rows(meta)]
        if sorted(shapes) != sorted(attrs.get("streams") or shapes):
            missing = sorted(set(attrs.get("streams") or []) - set(shapes))
            rec.update(status="incomplete", error=f"damaged: stream arrays missing: {missing}")
    rec["shapes"] = shapes
    return rec


def check_chunk_count(files: Files, video_id: str, stream: str, where: str) -> None:
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


def float16_streams(video_id: str, streams: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The streams of one video as the store keeps them (float16), checked: a safe video id and
    stream names, ``[T, d]`` arrays (or ``[T', h, w, C]`` maps) of finite numbers within float16
    range, every ``[T, d]`` stream with the same T. ValueError naming the video, the stream and
    what is wrong."""
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
            raise ValueError(f"video {video_id!r}, stream {name!r}: dtype {a.dtype} is not numeric")
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
    return arrays
