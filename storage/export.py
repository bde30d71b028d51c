"""Features out of the store: per-video NumPy files, and whole splits as arrays.

:func:`export_store` writes one file per video and stream, named as video_features names its
outputs, ``<video_id>_<stream>.npy`` (or ``.npz``, the array stored under the stream's name),
float32 ``[T, d]`` exactly as :meth:`FeatureStore.read` returns it. Each file is written under a
temporary name and renamed, so an interrupted export never leaves a truncated file. Beside each
``.npy`` goes ``<video_id>_<stream>_times.npy``, float64 ``[T]``: every row's presentation time
in seconds (:meth:`FeatureStore.times`; a window's centre), and ``<video_id>_<stream>_spans.npy``
``[T, 2]`` for window streams; an ``.npz`` holds them under ``times`` and ``time_spans``. Times
derived from fps (stores written without times) are written too, and counted in the summary.

:func:`to_numpy` pulls a split as one matrix for scikit-learn: ``pooling="mean"`` gives each video's
mean frame feature ``[n, d]``; ``pooling="nodes"`` its temporal pyramid node means, level by level,
left to right, concatenated ``[n, (2^levels - 1) d]`` (node (k, l) covers frames
``[floor((k-1) T / 2^(l-1)), max(floor(k T / 2^(l-1)), s + 1))``, the rule the heads use).

Only the store's public reading API is used (``videos``, ``read``, ``labels``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from storage.store import FeatureStore

EXPORT_FORMATS = ("npy", "npz")
POOLINGS = ("mean", "nodes")
ExportFormat = Literal["npy", "npz"]
Pooling = Literal["mean", "nodes"]


@dataclass
class ExportSummary:
    """What :func:`export_store` wrote: ``files`` in video order, and the totals."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    n_videos: int = 0
    bytes_written: int = 0
    derived_times: int = 0  # videos whose times were derived from fps (none recorded)

    def format(self) -> str:
        mib = self.bytes_written / 2**20
        derived = (
            f"; times of {self.derived_times} videos derived from fps and frame indices (the "
            "store recorded none)"
            if self.derived_times
            else ""
        )
        return (
            f"exported {self.n_videos} videos as {len(self.files)} files "
            f"({mib:.1f} MiB) to {self.out_dir}{derived}"
        )


def export_filename(video_id: str, stream: str, fmt: str) -> str:
    """video_features' naming: ``<video_id>_<stream>.<fmt>``."""
    return f"{video_id}_{stream}.{fmt}"


def _save(
    path: Path, stream: str, array: np.ndarray, fmt: str, extra: dict[str, np.ndarray] | None = None
) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:  # a file object: np.save would otherwise append ".npy"
        if fmt == "npy":
            np.save(f, array)
        else:
            np.savez_compressed(f, **{stream: array}, **(extra or {}))  # type: ignore[arg-type]
    os.replace(tmp, path)


def export_store(
    store: FeatureStore,
    out_dir: str | Path,
    *,
    fmt: str = "npy",
    split: str | None = None,
    streams: list[str] | None = None,
) -> ExportSummary:
    """Write every complete video of ``split`` (all when None) as per-stream NumPy files.

    ``streams`` defaults to every stream a video has. Existing files of the same name are
    replaced. Raises ValueError for an unknown format, an empty selection, or a requested stream
    some video lacks (before writing anything for that video).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    video_ids = store.videos(split=split)
    if not video_ids:
        where = f"split {split!r} of " if split is not None else ""
        raise ValueError(f"no complete videos in {where}{store.path}: nothing to export")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(out_dir=out)
    for vid in video_ids:
        names = streams if streams is not None else store.streams(vid)
        arrays = {s: store.read(vid, s) for s in names}  # KeyError names a missing stream
        derived = False
        for stream, array in arrays.items():
            times = store.times(vid, stream)
            derived = derived or times.derived
            extra = {"times": times.seconds}
            if times.spans is not None:
                extra["time_spans"] = times.spans
            paths = [out / export_filename(vid, stream, fmt)]
            if fmt == "npy":
                _save(paths[0], stream, array, fmt)
                for key, suffix in (("times", "times"), ("time_spans", "spans")):
                    if key in extra:
                        paths.append(out / export_filename(vid, f"{stream}_{suffix}", fmt))
                        _save(paths[-1], stream, extra[key], fmt)
            else:
                _save(paths[0], stream, array, fmt, extra)
            for path in paths:
                summary.files.append(path)
                summary.bytes_written += path.stat().st_size
        summary.n_videos += 1
        summary.derived_times += int(derived)
    return summary


def pyramid_node_means(x: np.ndarray, levels: int) -> np.ndarray:
    """``[2^levels - 1, d]`` node means of frame features ``x [T, d]`` (float64 prefix sums)."""
    if levels < 1:
        raise ValueError(f"pyramid levels must be >= 1, got {levels}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected frame features [T, d] with T >= 1, got shape {x.shape}")
    t = x.shape[0]
    csum = np.zeros((t + 1, x.shape[1]), dtype=np.float64)
    np.cumsum(x, axis=0, dtype=np.float64, out=csum[1:])
    rows = []
    for level in range(1, levels + 1):
        parts = 1 << (level - 1)
        for k in range(1, parts + 1):
            s = min(((k - 1) * t) // parts, t - 1)
            e = min(max((k * t) // parts, s + 1), t)
            rows.append((csum[e] - csum[s]) / (e - s))
    return np.stack(rows).astype(np.float32)


class SplitArrays(NamedTuple):
    """One split as arrays: ``X [n, D]`` float32, ``y [n]`` labels, and the videos' ids."""

    X: np.ndarray
    y: np.ndarray
    video_ids: list[str]


def to_numpy(
    store: FeatureStore,
    split: str | None,
    stream: str,
    *,
    pooling: str = "mean",
    levels: int = 3,
) -> SplitArrays:
    """A split's videos as one matrix for scikit-learn (see the module doc for ``pooling``).

    ``split`` is a video ``split`` attr or ``<list>/<part>`` of an imported split list (None: all
    complete videos). ``y`` holds the class names; a video without a label is a ValueError.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    video_ids = store.videos(split=split)
    if not video_ids:
        where = f"split {split!r} of " if split is not None else ""
        raise ValueError(f"no complete videos in {where}{store.path}")
    rows = []
    for vid in video_ids:
        x = store.read(vid, stream)
        if pooling == "mean":
            rows.append(x.mean(axis=0, dtype=np.float64).astype(np.float32))
        else:
            rows.append(pyramid_node_means(x, levels).reshape(-1))
    y = np.asarray(store.labels(video_ids), dtype=object)
    return SplitArrays(np.stack(rows), y, video_ids)
