"""``framepool extract --engine ray``: extraction past one machine on Ray Data.

::

    driver: video list -> ids, labels, what is left to do (the store's index)
      -> map_batches(prepare_videos)  CPU tasks: decode, resize, flow, stacks (extractor.prepare);
                                      one row per video holding its uint8 model inputs
      -> map_batches(EmbedVideos)     actor pool (one actor per GPU, or CPU actors): model batches
                                      of ``batch_size`` frames that cross video boundaries
      -> map_batches(write_videos)    CPU tasks: ``FeatureStore.write_video`` per finished video
      -> driver: one small row per video (status, frames, reason): progress and the summary

Ray Data streams the stages with backpressure; features go from the actors to the writing tasks
through the object store, never through the driver. Faults:

- A task or actor that dies (its process killed, its node gone) is retried or restarted by Ray
  (tasks ``max_retries=-1``; actors ``max_restarts=-1``, ``max_task_retries=-1``).
- Every video ends ``complete`` exactly once: the preparing and the writing task each read the
  video's group first and pass over a video that a killed attempt already finished, and
  :meth:`~storage.FeatureStore.write_video` never marks a half-written video complete.
- A bad file is a ``failed`` row carrying its reason (the exception is caught in the task, so
  Ray never retries it) and is recorded failed in the store.
- A driver killed mid-run loses nothing written: the same command again skips what is complete.

Ray is an optional dependency (``pip install "framepool[ray]"``), imported only here and only
when this engine runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from extractor.prepare import FrameChunk, VideoDone, check_selection, prepare_video
from extractor.progress import DEFAULT_INTERVAL, ExtractProgress
from extractor.sources import Source
from extractor.spec import BackboneSpec
from extractor.transforms import AppearanceInput
from extractor.urls import VideoPath

if TYPE_CHECKING:
    from extractor.records import ExtractionSummary

log = logging.getLogger(__name__)

RAY_MISSING = 'the ray engine needs Ray Data: pip install "framepool[ray]" (or use --engine local)'


@dataclass(frozen=True)
class RayOptions:
    """Where the Ray engine runs and what each stage asks of the cluster.

    ``address``: a cluster (``ray://...``, ``HOST:PORT``, ``auto``); None joins the cluster
    ``RAY_ADDRESS`` names, else starts a Ray instance on this machine for the run.
    ``model_actors``: model actors (default: one per GPU when the model runs on GPUs, else one
    per node); each asks for ``model_gpus`` GPUs (default 1 on a cluster with GPUs, 0 on CPUs)
    and ``model_cpus`` CPUs (also its torch threads on a CPU). ``prepare_cpus``,
    ``prepare_memory`` (bytes) and ``prepare_gpus`` (a GPU fraction, for RAFT flow) are asked by
    each preparing task; ``prepare_tasks`` caps how many run at once (default: as many as the
    cluster holds). ``write_cpus`` per writing task. ``videos_per_call``: videos handed to a
    model actor at once (its batches cross their boundaries). ``runtime_env``: Ray's runtime
    environment for every stage (e.g. ``{"env_vars": {...}}`` for object-store credentials).
    ``verbose`` lets Ray's own logs and progress bars through.
    """

    address: str | None = None
    model_actors: int | None = None
    model_gpus: float | None = None
    model_cpus: float = 1.0
    prepare_cpus: float = 1.0
    prepare_memory: int = 1 << 30
    prepare_gpus: float = 0.0
    prepare_tasks: int | None = None
    write_cpus: float = 0.25
    videos_per_call: int = 4
    runtime_env: Mapping[str, Any] | None = field(default=None, hash=False)
    verbose: bool = False

    def __post_init__(self) -> None:
        for name in ("model_actors", "prepare_tasks", "videos_per_call"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ray option {name} must be >= 1, got {value!r}")
        for name in ("model_cpus", "prepare_cpus", "prepare_gpus", "write_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"ray option {name} must be >= 0, got {getattr(self, name)!r}")
        if self.model_gpus is not None and self.model_gpus < 0:
            raise ValueError(f"ray option model_gpus must be >= 0, got {self.model_gpus!r}")


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or ImportError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    return ray


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Plan:
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


def _source_row(key: int, s: Source) -> dict[str, Any]:
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


def _store(plan: _Plan) -> Any:
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


def _flow(plan: _Plan) -> Any:
    if plan.flow is None:
        return None
    key = json.dumps(plan.flow, sort_keys=True) + plan.flow_device
    flow = _FLOWS.get(key)
    if flow is None:
        from extractor.flow import flow_from_config

        flow = _FLOWS[key] = flow_from_config(dict(plan.flow), device=plan.flow_device)
    return flow


def _finished(plan: _Plan, video_id: str) -> dict[str, Any] | None:
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
def _input_shapes(plan: _Plan) -> dict[str, tuple[int, ...]]:
    from extractor.transforms import CROP_SIZE, STACK_LENGTH

    shapes: dict[str, tuple[int, ...]] = {}
    if "appearance" in plan.streams:
        a = plan.appearance_input.crop_size
        shapes["appearance"] = (a, a, 3)
    if "motion" in plan.streams:
        shapes["motion"] = (CROP_SIZE, CROP_SIZE, 2 * STACK_LENGTH)
    return shapes


def _row(
    plan: _Plan,
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


def prepare_videos(batch: dict[str, np.ndarray], plan: _Plan) -> Iterator[dict[str, np.ndarray]]:
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


def _prepare(plan: _Plan, path: str | Path) -> tuple[list[FrameChunk], VideoDone]:
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
class _ModelSpec:
    spec: BackboneSpec
    device: str
    batch_size: int
    maps: tuple[str, ...]
    map_dim: int | None
    map_stride: int
    map_seed: int
    config: dict[str, Any]  # what the store records: every actor must compute exactly this


def build_extractor(m: _ModelSpec) -> Any:
    """The extractor ``m`` describes (in an actor, or on the driver to learn its config)."""
    from extractor.features import FeatureExtractor

    extractor = FeatureExtractor(m.spec, device=m.device, batch_size=m.batch_size)
    if m.maps:
        extractor.set_maps(m.maps, dim=m.map_dim, stride=m.map_stride, seed=m.map_seed)
    return extractor


class EmbedVideos:
    """Ray Data stage (an actor): the backbones over the frames of a call's videos, in batches
    of ``batch_size`` frames that cross video boundaries; one row of features per video."""

    def __init__(self, model: _ModelSpec, torch_threads: int) -> None:
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
    batch: dict[str, np.ndarray], plan: _Plan, names: tuple[str, ...]
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


# ---------------------------------------------------------------------------- the driver
@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool) -> Iterator[None]:
    """Send what Ray's C++ core writes to this process's stderr (one error line per actor pool
    about its constructor arguments, lines at start) to a file, while Python's own stderr (the
    progress line, framepool's log) keeps the terminal."""
    if not enabled:
        yield
        return
    try:
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        saved = os.dup(fd)
    except (OSError, ValueError):
        yield
        return
    old_stderr = sys.stderr
    with (
        tempfile.NamedTemporaryFile(prefix="framepool-ray-", suffix=".log", delete=False) as sink,
        os.fdopen(os.dup(saved), "w", buffering=1) as terminal,
    ):
        moved = []
        if old_stderr is sys.__stderr__:  # not captured (e.g. by pytest): Python keeps the tty
            sys.stderr = terminal
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is old_stderr:
                    handler.setStream(terminal)
                    moved.append(handler)
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sys.stderr = old_stderr
            for handler in moved:
                handler.setStream(old_stderr)
    log.debug("Ray's native log lines of this run: %s", sink.name)


def _connect(ray: Any, options: RayOptions) -> bool:
    """Join (or start) Ray with its own logging quiet unless ``verbose``; True when this call
    started it (and so must shut it down)."""
    from ray.data import DataContext

    quiet = not options.verbose
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "address": options.address,
            "log_to_driver": not quiet,
            "logging_level": logging.INFO if not quiet else logging.ERROR,
        }
        if options.address is None and not os.environ.get("RAY_ADDRESS"):
            # a Ray instance of this run's own, never another one running on this machine
            kwargs["address"] = "local"
            kwargs["include_dashboard"] = False
        if options.runtime_env:
            kwargs["runtime_env"] = dict(options.runtime_env)
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise ConnectionError(
                f"cannot reach the Ray cluster at {options.address!r}: {exc}"
            ) from None
        started = True
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.enable_operator_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    ctx.enable_auto_log_stats = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.INFO if not quiet else logging.ERROR)
    return started


def _nodes(ray: Any) -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")))


def _model_placement(ray: Any, device: str, options: RayOptions) -> tuple[str, float, int]:
    """``(actor device, GPUs per actor, number of actors)``."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"with --engine ray, device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and gpus == 0:
        raise ValueError("device 'cuda' requested but the Ray cluster has no GPU")
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if options.model_gpus is not None:
        per_actor = options.model_gpus if use_gpu else 0.0
        if use_gpu and per_actor == 0:
            raise ValueError("device cuda needs model_gpus > 0")
    else:
        per_actor = 1.0 if use_gpu else 0.0
    if options.model_actors is not None:
        actors = options.model_actors
    elif per_actor > 0:
        actors = max(1, int(gpus // per_actor))
    else:
        actors = _nodes(ray)
    return ("cuda" if per_actor > 0 else "cpu"), per_actor, actors


def _recorded_config(ray: Any, model: _ModelSpec, gpus: float) -> dict[str, Any]:
    """The extractor config the actors will compute (built where they run: a GPU's dtype may
    differ from this machine's)."""
    if gpus == 0:
        config = build_extractor(model).config()
    else:
        task = ray.remote(_config_of).options(num_gpus=gpus, num_cpus=1)
        config = ray.get(task.remote(model))
    return dict(json.loads(json.dumps(config)))


def _config_of(model: _ModelSpec) -> dict[str, Any]:
    return dict(build_extractor(model).config())


def run_extraction_ray(
    sources: Sequence[Source],
    store: str | Path,
    spec: BackboneSpec,
    *,
    maps: Sequence[str] = (),
    map_dim: int | None = None,
    map_stride: int = 1,
    map_seed: int = 0,
    device: str = "auto",
    batch_size: int = 32,
    shard: tuple[int, int] | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    sample_fps: float | None = None,
    progress: bool = True,
    progress_interval: float = DEFAULT_INTERVAL,
    options: RayOptions | None = None,
) -> ExtractionSummary:
    """Extract ``sources`` into ``store`` on a Ray cluster; returns an
    :class:`~extractor.records.ExtractionSummary` like the local engine's.

    ``spec.streams`` must already include the source streams of ``maps``. Raises ImportError
    when Ray is not installed, ValueError for unusable arguments; per-video problems are in the
    summary.
    """
    options = options or RayOptions()
    check_selection(stride, max_frames)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    ids = [s.video_id for s in sources]
    if len(set(ids)) != len(ids):
        raise ValueError("video ids are not unique; build sources with make_sources")
    ray = import_ray()
    start = time.perf_counter()
    with _quiet_native_stderr(not options.verbose):
        started = _connect(ray, options)
        try:
            return _run(
                ray,
                sources,
                str(store),
                spec,
                maps=tuple(maps),
                map_dim=map_dim,
                map_stride=map_stride,
                map_seed=map_seed,
                device=device,
                batch_size=batch_size,
                shard=shard,
                stride=stride,
                max_frames=max_frames,
                sample_fps=sample_fps,
                progress=progress,
                progress_interval=progress_interval,
                options=options,
                start=start,
            )
        finally:
            if started:
                ray.shutdown()


def _run(
    ray: Any,
    sources: Sequence[Source],
    store: str,
    spec: BackboneSpec,
    *,
    maps: tuple[str, ...],
    map_dim: int | None,
    map_stride: int,
    map_seed: int,
    device: str,
    batch_size: int,
    shard: tuple[int, int] | None,
    stride: int,
    max_frames: int | None,
    sample_fps: float | None,
    progress: bool,
    progress_interval: float,
    options: RayOptions,
    start: float,
) -> ExtractionSummary:
    from extractor.records import ExtractionSummary, todo_sources
    from storage import FeatureStore

    actor_device, gpus, actors = _model_placement(ray, device, options)
    model = _ModelSpec(spec, actor_device, batch_size, maps, map_dim, map_stride, map_seed, {})
    config = _recorded_config(ray, model, gpus)
    model = replace(model, config=config)
    class_names = sorted({s.label for s in sources if s.label is not None})
    fstore = FeatureStore.create(store, extractor=config, class_names=class_names)
    summary = ExtractionSummary(store=store)
    streams = tuple(s for s in spec.streams)
    requested = streams + maps
    todo = todo_sources(fstore, sources, requested, shard, summary)
    fstore.close()
    if todo:
        log.info(
            "extracting %d videos (%d already complete, %d in other shards) into %s on Ray "
            "(%d model actors, %s GPUs each)",
            len(todo),
            len(summary.skipped),
            summary.outside_shard,
            store,
            actors,
            gpus,
        )
        plan = _Plan(
            store=store,
            run=uuid.uuid4().hex,
            streams=streams,
            requested=requested,
            flow=config["motion"]["flow"] if "motion" in streams else None,
            flow_device="cuda" if options.prepare_gpus > 0 else "cpu",
            appearance_input=_appearance_input(config),
            stride=stride,
            max_frames=max_frames,
            torch_threads=max(1, int(options.prepare_cpus)),
            sample_fps=sample_fps,
        )
        results = _dataset(ray, todo, plan, model, options, gpus, actors)
        bar = ExtractProgress(len(todo), enabled=progress, interval=progress_interval)
        seen: set[str] = set()
        try:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                for vid, status, frames, error in zip(
                    batch["video_id"],
                    batch["status"],
                    batch["frames"],
                    batch["error"],
                    strict=True,
                ):
                    if str(vid) in seen:  # a retried task's row (Ray may replay one)
                        continue
                    seen.add(str(vid))
                    if status == "complete":
                        summary.complete.append(str(vid))
                        summary.frames += int(frames)
                    else:
                        summary.failed[str(vid)] = str(error)
                    bar.frames(int(frames))
                    if status == "complete":
                        bar.video_done()
                    else:
                        bar.video_failed()
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    summary.complete.sort()
    summary.skipped.sort()
    return summary


def _appearance_input(config: Mapping[str, Any]) -> AppearanceInput:
    from extractor.features import _recorded_appearance_input

    if "appearance" not in config:
        return AppearanceInput()
    return _recorded_appearance_input(config["appearance"])


def _dataset(
    ray: Any,
    todo: Sequence[Source],
    plan: _Plan,
    model: _ModelSpec,
    options: RayOptions,
    gpus: float,
    actors: int,
) -> Any:
    """The Ray Data pipeline over ``todo`` (lazy: iterating it runs it)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    env = {"runtime_env": dict(options.runtime_env)} if options.runtime_env else {}
    cpus = float(ray.cluster_resources().get("CPU", 1))
    # small blocks of videos: every preparing task streams its videos out one by one, and a
    # retried task redoes few of them
    n_blocks = max(1, min(len(todo), max(4 * int(cpus), -(-len(todo) // 16))))
    items = [_source_row(i, s) for i, s in enumerate(todo)]
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    names = tuple((*plan.streams, *model.maps))
    prepare: dict[str, Any] = {
        "batch_size": 1,
        "fn_kwargs": {"plan": plan},
        "num_cpus": options.prepare_cpus,
        # a memory reservation per task: a node runs no more preparing tasks than its memory
        # holds; it also keeps Ray Data from fusing this stage into the model actors
        "memory": options.prepare_memory,
        **env,
    }
    if options.prepare_gpus > 0:
        prepare["num_gpus"] = options.prepare_gpus
    if options.prepare_tasks is not None:
        prepare["compute"] = TaskPoolStrategy(size=options.prepare_tasks)
    ds = ds.map_batches(prepare_videos, **prepare)
    ds = ds.map_batches(
        EmbedVideos,
        batch_size=options.videos_per_call,
        fn_constructor_kwargs={"model": model, "torch_threads": max(1, int(options.model_cpus))},
        compute=ActorPoolStrategy(size=actors),
        num_cpus=options.model_cpus,
        num_gpus=gpus,
        **env,
    )
    return ds.map_batches(
        write_videos,
        batch_size=1,
        fn_kwargs={"plan": plan, "names": names},
        num_cpus=options.write_cpus,
        **env,
    )


def options_dict(options: RayOptions) -> dict[str, Any]:
    """``options`` as plain values (for logs and benchmark records)."""
    return dataclasses.asdict(options)
