"""The Zarr v3 feature store: one group per video, one float16 array per stream.

Layout (the contract other parts rely on)::

    /                          attrs: schema_version, created_by, extractor, class_names
    /videos/<video_id>/<stream>   float16 [T, d]
    /videos/<video_id>            attrs: label, split, source, source_sha256, n_frames, fps,
                                  width, height, status, error, extracted_at
    /splits                       attrs: named split lists {name: {part: [video_id, ...]}}
    /cache/<name>/<key>/...       derived data, keyed by a hash of its inputs

A video is marked ``complete`` only after every one of its streams is written; until then its
status is ``incomplete`` (or the group is absent), so a crash never leaves a half-written video
that looks finished.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr

from storage.ids import safe_video_id

if TYPE_CHECKING:
    from storage.export import ExportSummary, SplitArrays

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


class FeatureStore:
    """Per-frame features of many videos in one Zarr v3 group.

    Use :meth:`create` for a new (or existing) store and :meth:`open` for an existing one.
    """

    def __init__(self, root: zarr.Group, path: str, mode: Mode) -> None:
        self._root = root
        self.path = path
        self.mode = mode

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
        two different extractors. ``class_names`` are merged into the recorded ones.
        """
        spath = str(path)
        try:
            root = zarr.open_group(spath, mode="a")
        except Exception as exc:
            raise OSError(f"cannot create a feature store at {spath!r}: {exc}") from exc
        attrs = dict(root.attrs)
        if attrs.get("schema_version") is None:
            if list(root.keys()):
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
            root.require_group("videos")
            return cls(root, spath, "a")
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
        """The extractor configuration per stream, as recorded at creation."""
        return dict(_attr(self._root, "extractor", {}))

    def _merge_extractor(self, extractor: dict[str, Any]) -> None:
        current = self.extractor
        extractor = _jsonable(extractor)
        for stream, cfg in extractor.items():
            if stream in current and current[stream] != cfg:
                raise ValueError(
                    f"store {self.path!r} holds stream {stream!r} extracted with "
                    f"{current[stream]}, which differs from the requested {cfg}; "
                    "use a new store (or remove the stream) to change the extractor"
                )
        if any(s not in current for s in extractor):
            self._writable()
            current.update(extractor)
            self._root.attrs.update({"extractor": current})

    @property
    def class_names(self) -> list[str]:
        """Recorded class names, or the sorted labels of the stored videos when none recorded."""
        names = list(_attr(self._root, "class_names", []))
        if names:
            return names
        labels = {self.video_attrs(v).get("label") for v in self.videos(status=None)}
        return sorted(str(label) for label in labels if label is not None)

    def add_class_names(self, names: list[str]) -> None:
        self._writable()
        current = list(_attr(self._root, "class_names", []))
        merged = sorted(set(current) | {str(n) for n in names})
        if merged != current:
            self._root.attrs.update({"class_names": merged})

    # ------------------------------------------------------------------ videos
    def _videos_group(self) -> zarr.Group:
        if "videos" not in self._root:
            if self.mode == "r":
                raise KeyError(f"store {self.path!r} has no /videos group")
            return self._root.require_group("videos")
        grp = self._root["videos"]
        assert isinstance(grp, zarr.Group)
        return grp

    def _video_group(self, video_id: str) -> zarr.Group:
        videos = self._videos_group()
        if video_id not in videos:
            raise KeyError(f"video {video_id!r} is not in store {self.path!r}")
        grp = videos[video_id]
        assert isinstance(grp, zarr.Group)
        return grp

    def write_video(
        self,
        video_id: str,
        streams: Mapping[str, np.ndarray],
        *,
        label: str | None = None,
        split: str | None = None,
        meta: Mapping[str, Any] | None = None,
        overwrite: bool = True,
    ) -> None:
        """Write all streams of one video, then mark it ``complete``.

        ``streams`` maps a stream name to a ``[T, d]`` array (stored as float16); every stream of
        one video has the same T. A video already ``complete`` is rewritten only with ``overwrite``.
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
            if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
                raise ValueError(
                    f"video {video_id!r}, stream {name!r}: expected a [T, d] array with T, d >= 1, "
                    f"got shape {a.shape}"
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
            lengths.add(a.shape[0])
        if len(lengths) != 1:
            shapes = {k: v.shape for k, v in arrays.items()}
            raise ValueError(f"video {video_id!r}: streams differ in T: {shapes}")

        videos = self._videos_group()
        if video_id in videos:
            status = videos[video_id].attrs.get("status")
            if status == "complete" and not overwrite:
                raise FileExistsError(f"video {video_id!r} is already complete in {self.path!r}")
        attrs: dict[str, Any] = {
            "label": label,
            "split": split,
            **_jsonable(dict(meta or {})),
            "status": "incomplete",
            "streams": sorted(arrays),
        }
        # The group is (re)created with status "incomplete"; only the last write below marks it
        # complete, so an interrupted write is never mistaken for a finished one.
        grp = videos.create_group(video_id, overwrite=True, attributes=attrs)
        for name, a16 in arrays.items():
            t, d = a16.shape
            rows = max(1, min(t, (1 << 20) // (2 * d)))  # about 1 MiB per chunk
            z = grp.create_array(name=name, shape=(t, d), dtype="float16", chunks=(rows, d))
            z[...] = a16
        grp.attrs.update({"status": "complete", "error": None, "extracted_at": _now()})

    def mark_failed(
        self,
        video_id: str,
        error: str,
        *,
        label: str | None = None,
        split: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Record that ``video_id`` could not be extracted and why (no feature arrays)."""
        self._writable()
        videos = self._videos_group()
        attrs = {
            "label": label,
            "split": split,
            **_jsonable(dict(meta or {})),
            "status": "failed",
            "error": str(error),
            "extracted_at": _now(),
            "streams": [],
        }
        videos.create_group(video_id, overwrite=True, attributes=attrs)

    def delete_video(self, video_id: str) -> None:
        self._writable()
        videos = self._videos_group()
        if video_id in videos:
            del videos[video_id]

    def status(self, video_id: str) -> str | None:
        """``complete``, ``failed``, ``incomplete``, or None when the video is absent."""
        videos = self._videos_group()
        if video_id not in videos:
            return None
        return str(videos[video_id].attrs.get("status", "incomplete"))

    def video_attrs(self, video_id: str) -> dict[str, Any]:
        return dict(self._video_group(video_id).attrs)

    def update_video_attrs(self, video_id: str, **attrs: Any) -> None:
        """Change descriptive attrs (label, split, ...) of a stored video; never its status."""
        self._writable()
        if "status" in attrs:
            raise ValueError("status is set by write_video/mark_failed only")
        self._video_group(video_id).attrs.update(_jsonable(attrs))

    def streams(self, video_id: str) -> list[str]:
        return sorted(self._video_group(video_id).array_keys())

    def n_frames(self, video_id: str, stream: str) -> int:
        arr = self._video_group(video_id)[stream]
        assert isinstance(arr, zarr.Array)
        return int(arr.shape[0])

    def read(self, video_id: str, stream: str, dtype: Any = np.float32) -> np.ndarray:
        """The ``[T, d]`` features of one stream of a complete video (float32 by default)."""
        grp = self._video_group(video_id)
        status = grp.attrs.get("status")
        if status != "complete":
            raise ValueError(f"video {video_id!r} in {self.path!r} is {status}, not complete")
        if stream not in grp:
            raise KeyError(
                f"video {video_id!r} has no stream {stream!r}; it has {sorted(grp.array_keys())}"
            )
        arr = grp[stream]
        assert isinstance(arr, zarr.Array)
        return np.asarray(arr[...]).astype(dtype, copy=False)

    def videos(self, split: str | None = None, status: str | None = "complete") -> list[str]:
        """Sorted video ids with the given ``status`` (None: any) and ``split``.

        ``split`` matches a video's ``split`` attr, or names a part of an imported split list as
        ``<list>/<part>`` (e.g. ``ucf101-1/train``).
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES} or None, got {status!r}")
        if "videos" not in self._root:
            return []
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
        out = []
        for vid, grp in self._videos_group().groups():
            attrs = grp.attrs
            if status is not None and attrs.get("status", "incomplete") != status:
                continue
            if split is not None:
                if members is not None:
                    if vid not in members:
                        continue
                elif attrs.get("split") != split:
                    continue
            out.append(vid)
        return sorted(out)

    def all_video_attrs(self, status: str | None = None) -> dict[str, dict[str, Any]]:
        """Attrs of every video (with ``status``, or any when None) in one listing pass.

        Much faster than :meth:`video_attrs` per video on large stores: the group listing reads
        each video's metadata once.
        """
        if "videos" not in self._root:
            return {}
        out = {}
        for vid, grp in self._videos_group().groups():
            attrs = dict(grp.attrs)
            if status is None or attrs.get("status", "incomplete") == status:
                out[vid] = attrs
        return dict(sorted(out.items()))

    def iter_videos(self, **kw: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        for vid in self.videos(**kw):
            yield vid, self.video_attrs(vid)

    def labels(self, video_ids: list[str]) -> list[str]:
        """Labels of ``video_ids``; ValueError naming the first video without one."""
        everything = self.all_video_attrs() if len(video_ids) > 16 else None
        out = []
        for vid in video_ids:
            attrs = (
                everything[vid]
                if everything is not None and vid in everything
                else self.video_attrs(vid)
            )
            label = attrs.get("label")
            if label is None:
                raise ValueError(f"video {vid!r} in {self.path!r} has no label")
            out.append(str(label))
        return out

    # ------------------------------------------------------------------ splits
    def split_lists(self) -> dict[str, dict[str, list[str]]]:
        if "splits" not in self._root:
            return {}
        return dict(_attr(self._root["splits"], "lists", {}))

    def set_split_list(self, name: str, parts: Mapping[str, list[str]]) -> None:
        """Record a named split list, e.g. ``ucf101-1`` with parts ``train`` and ``test``."""
        self._writable()
        if not name or "/" in name:
            raise ValueError(f"split list name {name!r} must be non-empty and contain no '/'")
        grp = self._root.require_group("splits")
        lists = dict(_attr(grp, "lists", {}))
        lists[name] = {str(p): sorted(map(str, ids)) for p, ids in parts.items()}
        grp.attrs.update({"lists": lists})

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
    ) -> dict[str, zarr.Array]:
        """Create empty cache arrays ``{array: (shape, dtype, chunks)}`` under a fresh group.

        Fill them, then call :meth:`finish_cache`; until then the cache reads as absent. Older
        entries under ``/cache/<name>`` (other keys) are removed: they were derived from data that
        has since changed.
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
            arrays[arr_name] = grp.create_array(
                name=arr_name, shape=shape, dtype=dtype, chunks=chunks
            )
        return arrays

    def finish_cache(self, name: str, key: str) -> None:
        grp = self._root[f"cache/{name}/{key}"]
        grp.attrs.update({"complete": True, "created_at": _now()})

    # ------------------------------------------------------------------ summary
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: counts by status, split and class, streams and dims, failures."""
        by_status: dict[str, int] = {s: 0 for s in STATUSES}
        by_split: dict[str, int] = {}
        by_class: dict[str, int] = {}
        stream_dims: dict[str, int] = {}
        failures: list[dict[str, str]] = []
        total_frames = 0
        if "videos" in self._root:
            for vid, grp in self._videos_group().groups():
                attrs = dict(grp.attrs)
                status = str(attrs.get("status", "incomplete"))
                by_status[status] = by_status.get(status, 0) + 1
                if status == "failed":
                    failures.append({"video_id": vid, "error": str(attrs.get("error"))})
                    continue
                if status != "complete":
                    continue
                split = attrs.get("split")
                if split is not None:
                    by_split[str(split)] = by_split.get(str(split), 0) + 1
                label = attrs.get("label")
                if label is not None:
                    by_class[str(label)] = by_class.get(str(label), 0) + 1
                lengths = []
                for name, arr in grp.arrays():
                    stream_dims[name] = int(arr.shape[1])
                    lengths.append(int(arr.shape[0]))
                total_frames += max(lengths, default=0)
        attrs = self.attrs
        return {
            "path": self.path,
            "schema_version": attrs.get("schema_version"),
            "created_by": attrs.get("created_by"),
            "n_videos": sum(by_status.values()),
            "status": by_status,
            "total_frames": total_frames,
            "streams": stream_dims,
            "class_names": self.class_names,
            "videos_per_class": dict(sorted(by_class.items())),
            "videos_per_split": dict(sorted(by_split.items())),
            "split_lists": {
                n: {p: len(ids) for p, ids in parts.items()}
                for n, parts in self.split_lists().items()
            },
            "extractor": attrs.get("extractor", {}),
            "failed": sorted(failures, key=lambda f: f["video_id"]),
        }

    # ------------------------------------------------------------------ export
    def to_numpy(
        self, split: str | None, stream: str, pooling: str = "mean", levels: int = 3
    ) -> SplitArrays:
        """A split as ``(X, y, video_ids)`` for scikit-learn: :func:`storage.export.to_numpy`."""
        from storage.export import to_numpy

        return to_numpy(self, split, stream, pooling=pooling, levels=levels)

    def export(
        self, out_dir: str | Path, fmt: str = "npy", split: str | None = None
    ) -> ExportSummary:
        """Per-video, per-stream NumPy files; see :func:`storage.export.export_store`."""
        from storage.export import export_store

        return export_store(self, out_dir, fmt=fmt, split=split)
