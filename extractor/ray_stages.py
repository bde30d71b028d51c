"""The stages of ``framepool extract --engine ray`` (:mod:`extractor.ray_engine`), as Ray Data runs
them in worker processes: prepare (CPU tasks), embed (an actor pool), write (CPU tasks).

Each stage gets a :class:`Plan` (what every stage needs to know about the run) and exchanges one
row per video. A stage never raises for one bad video: the row carries ``failed`` and the reason,
so that Ray never retries a file that will fail again. Whatever a killed attempt left behind is
found in the store (:func:`_finished`): a video is written complete exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extractor.prepare import FrameChunk, VideoDone, prepare_video
from extractor.sources import Source
from extractor.spec import BackboneSpec
from extractor.transforms import AppearanceInput
from extractor.urls import VideoPath

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """What every stage needs to know about the run (sent to the workers once per stage)."""

    store: str
    run: str  # a token of this run: workers keep one open store per run
    streams: tuple[str, ...]  # pooled streams the model computes
    requested: tuple[str, ...]  # every stream a complete video must hold (maps included)
    flow: dict[str, Any] | None  # the flow backend's recorded config
    flow_device: str
    appearance_input: AppearanceInput
    stride: int
    max_frames: int | None
    torch_threads: int
    sample_fps: float | None = None


def source_row(key: int, s: Source) -> dict[str, Any]:
    src = {"path": str(s.path), "video_id": s.video_id, "label": s.label, "split": s.split}
    src["group"] = s.group
    return {"key": key, "source": json.dumps(src)}


def _source(text: str) -> Source:
    from extractor.urls import local_or_url

    d = json.loads(text)
    return Source(
        path=local_or_url(d["path"]),
        video_id=d["video_id"],
        label=d["label"],
        split=d["split"],
        group=d["group"],
    )


# ---------------------------------------------------------------------------- per-process state
_STORES: dict[str, Any] = {}  # run token -> the FeatureStore this process writes with
_FLOWS: dict[str, Any] = {}  # flow config (JSON) -> this process's flow backend


def _store(plan: Plan) -> Any:
    """This worker process's store for the run (one index part per process, not per task)."""
    from storage import FeatureStore

    store = _STORES.get(plan.run)
    if store is None:
        for old in _STORES.values():  # a previous run's: freeze its index part
            with contextlib.suppress(Exception):
                old.close()
        _STORES.clear()
        store = _STORES[plan.run] = FeatureStore.open(plan.store, "a")
    return store


def _flow(plan: Plan) -> Any:
    if plan.flow is None:
        return None
    key = json.dumps(plan.flow, sort_keys=True) + plan.flow_device
    flow = _FLOWS.get(key)
    if flow is None:
        from extractor.flow import flow_from_config

        flow = _FLOWS[key] = flow_from_config(dict(plan.flow), device=plan.flow_device)
    return flow


def _finished(plan: Plan, video_id: str) -> dict[str, Any] | None:
    """The group attrs of ``video_id`` when it is complete with every requested stream (an
    earlier attempt of this run finished it), read from the group itself, else None."""
    try:
        attrs: dict[str, Any] = _store(plan).video_attrs(video_id)
    except KeyError:
        return None
    done = attrs.get("status") == "complete" and set(plan.requested) <= set(
        attrs.get("streams") or ()
    )
    return attrs if done else None


def _kept_frames(attrs: Mapping[str, Any]) -> int:
    kept = attrs.get("frame_indices")
    return len(kept) if isinstance(kept, list) else int(attrs.get("n_frames") or 0)


# ---------------------------------------------------------------------------- stage 1: prepare
def _input_shapes(plan: Plan) -> dict[str, tuple[int, ...]]:
    from extractor.transforms import CROP_SIZE, STACK_LENGTH

    shapes: dict[str, tuple[int, ...]] = {}
    if "appearance" in plan.streams:
        a = plan.appearance_input.crop_size
        shapes["appearance"] = (a, a, 3)
    if "motion" in plan.streams:
        shapes["motion"] = (CROP_SIZE, CROP_SIZE, 2 * STACK_LENGTH)
    return shapes


def _row(
    plan: Plan,
    key: int,
    source: str,
    status: str,
    *,
    error: str = "",
    meta: Mapping[str, Any] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    indices: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One video as a one-row batch (arrays of every input stream, empty unless ``ready``)."""
    row: dict[str, np.ndarray] = {
        "key": np.array([key], dtype=np.int64),
        "source": np.array([source], dtype=object),
        "status": np.array([status], dtype=object),
        "error": np.array([error], dtype=object),
        "meta": np.array([json.dumps(meta or {})], dtype=object),
    }
    idx = indices if indices is not None else np.zeros(0, dtype=np.int64)
    row["indices"] = _one(idx)
    for stream, shape in _input_shapes(plan).items():
        arr = (inputs or {}).get(stream)
        row[stream] = _one(arr if arr is not None else np.zeros((0, *shape), dtype=np.uint8))
    return row


def _one(arr: np.ndarray) -> np.ndarray:
    """A column of one row holding ``arr`` (an object array, so rows may differ in shape)."""
    col = np.empty(1, dtype=object)
    col[0] = arr
    return col


def prepare_videos(batch: dict[str, np.ndarray], plan: Plan) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: each video of ``batch`` -> one row with its uint8 inputs (or its
    failure, or ``done`` when an earlier attempt of this run already wrote it)."""
    import torch

    from extractor.decode import VideoError
    from extractor.flow import sha256_file
    from extractor.records import stream_times, video_meta

    torch.set_num_threads(plan.torch_threads)
    for key, text in zip(batch["key"], batch["source"], strict=True):
        source = _source(str(text))
        attrs = _finished(plan, source.video_id)
        if attrs is not None:
            yield _row(plan, int(key), text, "done", meta={"frames": _kept_frames(attrs)})
            continue
        try:
            with _fetched(source.path) as (path, digest):
                chunks, done = _prepare(plan, path)
            subsampled = (
                plan.stride > 1 or plan.max_frames is not None or plan.sample_fps is not None
            )
            meta = video_meta(source, done, digest or sha256_file(source.path), subsampled)
            meta["times"] = stream_times(done, plan.streams)
        except VideoError as exc:
            yield _row(plan, int(key), text, "failed", error=str(exc))
            continue
        except Exception as exc:
            log.exception("preparing %s failed", source.path)
            why = f"{str(source.path)!r}: {type(exc).__name__}: {exc}"
            yield _row(plan, int(key), text, "failed", error=why)
            continue
        inputs = {
            s: np.concatenate([getattr(c, s) for c in chunks])
            if chunks
            else np.zeros((0, *shape), dtype=np.uint8)
            for s, shape in _input_shapes(plan).items()
        }
        indices = np.concatenate([c.indices for c in chunks]) if chunks else None
        yield _row(plan, int(key), text, "ready", meta=meta, inputs=inputs, indices=indices)


def _prepare(plan: Plan, path: str | Path) -> tuple[list[FrameChunk], VideoDone]:
    chunks: list[FrameChunk] = []
    done: VideoDone | None = None
    for item in prepare_video(
        path,
        streams=plan.streams,
        flow=_flow(plan),
        stride=plan.stride,
        max_frames=plan.max_frames,
        sample_fps=plan.sample_fps,
        chunk_size=64,
        appearance_input=plan.appearance_input,
    ):
        if isinstance(item, VideoDone):
            done = item
        else:
            chunks.append(item)
    assert done is not None  # prepare_video ends with VideoDone
    return chunks, done


@contextlib.contextmanager
def _fetched(path: VideoPath) -> Iterator[tuple[VideoPath, str | None]]:
    """``(path to decode, sha256 or None)``: a URL is read once, through fsspec, into this
    process's memory filesystem (decoding then reads it as a file object, under the same
    demuxer allowlist) instead of once for the probe, once per decoding pass and once for its
    hash; the problems found name the URL, not the copy. A local path is used as it is."""
    from extractor.decode import VideoError
    from extractor.urls import filesystem, is_url, url_name

    if not is_url(path):
        yield path, None
        return
    url = str(path)
    fs, inner = filesystem(url)
    try:
        data: bytes = fs.cat_file(inner)
    except FileNotFoundError:
        raise VideoError(f"{url!r}: no such file") from None
    except IsADirectoryError:
        raise VideoError(f"{url!r}: is a directory, not a video file") from None
    memory, _ = filesystem("memory://")
    copy = f"memory://framepool-{uuid.uuid4().hex}/{url_name(url)}"
    memory.pipe_file(copy, data)
    try:
        yield copy, hashlib.sha256(data).hexdigest()
    except VideoError as exc:
        raise type(exc)(str(exc).replace(repr(copy), repr(url))) from exc
    finally:
        memory.rm(copy.split("://", 1)[1].rsplit("/", 1)[0], recursive=True)


# ---------------------------------------------------------------------------- stage 2: embed
@dataclass(frozen=True)
class ModelSpec:
    spec: BackboneSpec
    device: str
    batch_size: int
    maps: tuple[str, ...]
    map_dim: int | None
    map_stride: int
    map_seed: int
    config: dict[str, Any]  # what the store records: every actor must compute exactly this


def build_extractor(m: ModelSpec) -> Any:
    """The extractor ``m`` describes (in an actor, or on the driver to learn its config)."""
    from extractor.features import FeatureExtractor

    extractor = FeatureExtractor(m.spec, device=m.device, batch_size=m.batch_size)
    if m.maps:
        extractor.set_maps(m.maps, dim=m.map_dim, stride=m.map_stride, seed=m.map_seed)
    return extractor


class EmbedVideos:
    """Ray Data stage (an actor): the backbones over the frames of a call's videos, in batches
    of ``batch_size`` frames that cross video boundaries; one row of features per video."""

    def __init__(self, model: ModelSpec, torch_threads: int) -> None:
        import torch

        if model.device == "cpu":
            torch.set_num_threads(torch_threads)
        self.extractor = build_extractor(model)
        config = json.loads(json.dumps(self.extractor.config()))
        if config != model.config:
            diff = sorted(
                s for s in set(config) | set(model.config) if config.get(s) != model.config.get(s)
            )
            raise ValueError(
                f"the model actor on {os.uname().nodename} computes streams {diff} differently "
                f"from the store's record (e.g. another dtype on this machine's "
                f"{model.device}): {config} != {model.config}; pass an explicit --precision"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ex = self.extractor
        n_rows = len(batch["key"])
        ready = [i for i in range(n_rows) if batch["status"][i] == "ready"]
        status = np.array(batch["status"], dtype=object)
        error = np.array(batch["error"], dtype=object)
        features: dict[str, list[np.ndarray | None]] = {
            s: [None] * n_rows for s in (*ex.streams, *ex.map_streams)
        }
        try:
            self._embed(batch, ready, features)
        except Exception as exc:  # the model failed on these videos: record why, go on
            log.exception("the model failed on a batch")
            for i in ready:
                status[i] = "failed"
                error[i] = f"the model failed on this video's batch: {type(exc).__name__}: {exc}"
        out = {k: np.asarray(batch[k]) for k in ("key", "source")}
        out["status"], out["error"] = status, error
        out["meta"] = np.array(
            [self._meta(str(batch["meta"][i]), batch["indices"][i]) for i in range(n_rows)],
            dtype=object,
        )
        for name, per_row in features.items():
            col = np.empty(n_rows, dtype=object)
            for i in range(n_rows):
                value = per_row[i] if status[i] == "ready" else None
                col[i] = value if value is not None else _no_features(ex, name)
            out[name] = col
        return out

    def _meta(self, text: str, indices: np.ndarray) -> str:
        """A video's metadata, with the frames its maps were kept at (as the local engine)."""
        ex = self.extractor
        if not ex.map_streams or not len(indices):
            return text
        meta = json.loads(text)
        meta["map_frame_indices"] = np.asarray(indices)[:: ex.map_stride].tolist()
        meta["map_stride"] = ex.map_stride
        return json.dumps(meta)

    def _embed(
        self,
        batch: Mapping[str, np.ndarray],
        ready: Sequence[int],
        features: dict[str, list[np.ndarray | None]],
    ) -> None:
        ex = self.extractor
        lengths = [len(batch["indices"][i]) for i in ready]
        inputs = {s: [np.asarray(batch[s][i]) for i in ready] for s in ex.streams}
        # each frame's position within its video (map rows are every map_stride-th one)
        position = np.concatenate([np.arange(n) for n in lengths]) if lengths else np.zeros(0)
        total = int(sum(lengths))
        parts: dict[str, list[np.ndarray]] = {s: [] for s in (*ex.streams, *ex.map_streams)}
        for start in range(0, total, ex.batch_size):
            stop = min(total, start + ex.batch_size)
            frames = {s: _take(inputs[s], lengths, start, stop) for s in ex.streams}
            if ex.map_streams:
                rows = np.flatnonzero(position[start:stop] % ex.map_stride == 0)
                out, maps = ex.embed_with_maps(frames, rows)
                for name, m in maps.items():
                    parts[name].append(m)
            else:
                out = ex.embed(frames)
            for s in ex.streams:
                parts[s].append(out[s].astype(np.float16))
        joined = {name: np.concatenate(p) if p else None for name, p in parts.items()}
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        for j, i in enumerate(ready):
            a, b = bounds[j], bounds[j + 1]
            for s in ex.streams:
                arr = joined[s]
                features[s][i] = arr[a:b] if arr is not None else None
            for name in ex.map_streams:
                arr = joined[name]
                if arr is None:
                    continue
                # map rows kept before this video, and this video's own
                before = int(sum(-(-n // ex.map_stride) for n in lengths[:j]))
                mine = -(-lengths[j] // ex.map_stride)
                features[name][i] = arr[before : before + mine]


def _take(
    arrays: Sequence[np.ndarray], lengths: Sequence[int], start: int, stop: int
) -> np.ndarray:
    """Frames ``start:stop`` of the videos' frames laid end to end (one copy)."""
    pieces, offset = [], 0
    for arr, n in zip(arrays, lengths, strict=True):
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            pieces.append(arr[a - offset : b - offset])
        offset += n
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _no_features(extractor: Any, name: str) -> np.ndarray:
    if name in extractor.streams:
        return np.zeros((0, extractor.feature_dims[name]), dtype=np.float16)
    return np.zeros((0, 1, 1, 1), dtype=np.float16)


# ---------------------------------------------------------------------------- stage 3: write
def write_videos(
    batch: dict[str, np.ndarray], plan: Plan, names: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Ray Data stage: write each finished video (or record its failure) into the store;
    returns one small row per video for the driver's progress and summary."""
    from extractor.records import record_failure, store_video

    store = _store(plan)
    n_rows = len(batch["key"])
    out_status = np.empty(n_rows, dtype=object)
    out_error = np.empty(n_rows, dtype=object)
    frames = np.zeros(n_rows, dtype=np.int64)
    ids = np.empty(n_rows, dtype=object)
    for i in range(n_rows):
        source = _source(str(batch["source"][i]))
        ids[i] = source.video_id
        status, error = str(batch["status"][i]), str(batch["error"][i])
        meta = json.loads(str(batch["meta"][i]))
        if status == "done":
            out_status[i], frames[i] = "complete", int(meta.get("frames", 0))
        elif status == "failed":
            record_failure(store, source, error)
            out_status[i], out_error[i] = "failed", error
        else:
            streams = {name: np.asarray(batch[name][i]) for name in names}
            n = len(meta.get("frame_indices") or ()) or int(streams[names[0]].shape[0])
            attrs = _finished(plan, source.video_id)
            try:
                if attrs is None:  # else an earlier attempt of this run wrote it
                    store_video(store, source, streams, meta, n)
            except Exception as exc:
                log.exception("writing %s failed", source.video_id)
                why = f"{str(source.path)!r}: could not write its features: {exc}"
                record_failure(store, source, why)
                out_status[i], out_error[i] = "failed", why
                continue
            out_status[i], frames[i] = "complete", n
        out_error[i] = out_error[i] or ""
    return {"video_id": ids, "status": out_status, "frames": frames, "error": out_error}
