"""Batch extraction into a feature store: a pipeline, not a per-frame loop.

::

    sources --> worker threads (decode, resize, flow, stacks; uint8) --bounded queue--> main thread
                (batches of frames that cross video boundaries, both backbones in bfloat16 where
                the device supports it, BatchNorm folded, channels_last)
                --> writer thread (one ``store.write_video`` per finished video)

Threads rather than processes: decoding (FFmpeg), resizing (torch) and flow (OpenCV) release the
GIL, and the uint8 inputs (about 1 MB per frame with motion) then never cross a process boundary.
On a CUDA device each worker can decode with NVDEC (torchcodec) and resize there; RAFT flow pairs
from all workers are batched into one model (:class:`extractor.flow.RaftFlow`).

Guarantees:

- **Atomic completion**: a video is written, and marked ``complete``, only once every requested
  stream of every kept frame is computed; a crash leaves it absent or ``incomplete``.
- **Resumable**: videos already ``complete`` (with every requested stream) are skipped; absent,
  ``incomplete`` and ``failed`` ones are (re)done, so a rerun finishes exactly the unfinished
  videos; a file that is still bad fails again with its reason. A complete video that lacks a
  requested stream gets it added, its other streams kept.
- **Failures** are per video: ``store.mark_failed(video_id, reason)`` (the reason names the file)
  and the run goes on; the summary lists them.
- **Sharding**: with ``shard=(i, n)`` only the videos whose id hashes to shard i are done; class
  names come from the whole input list, so every shard records the same ones.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from extractor.backbones import STREAMS
from extractor.decode import VideoError
from extractor.decode_torchcodec import FrameReader, make_frame_reader
from extractor.features import MAP_STREAMS, FeatureExtractor
from extractor.flow import FlowBackend, sha256_file
from extractor.prepare import FrameChunk, VideoDone, check_selection, prepare_video
from extractor.progress import DEFAULT_INTERVAL, ExtractProgress
from extractor.sharding import in_shard, parse_shard, shard_from_env
from extractor.sources import Source, make_sources
from extractor.spec import BackboneSpec
from storage import FeatureStore

if TYPE_CHECKING:
    from extractor.ray_engine import RayOptions

log = logging.getLogger(__name__)


ENGINES = ("local", "ray")


@dataclass
class ExtractionSummary:
    """What one run did. ``complete``: extracted now; ``skipped``: complete before the run."""

    store: str
    complete: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # video id -> reason
    outside_shard: int = 0
    frames: int = 0  # frames of the videos completed in this run
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{len(self.complete)} extracted ({self.frames} frames, {rate:.1f} frames/s, "
            f"{self.seconds:.1f} s), {len(self.skipped)} already complete, "
            f"{len(self.failed)} failed"
            + (f", {self.outside_shard} in other shards" if self.outside_shard else "")
            + f" -> {self.store}"
        ]
        lines.extend(f"  failed {vid}: {reason}" for vid, reason in sorted(self.failed.items()))
        return "\n".join(lines)


# ---------------------------------------------------------------------------- messages
@dataclass
class _Chunk:
    key: int
    chunk: FrameChunk


@dataclass
class _Done:
    key: int
    done: VideoDone
    sha256: str


@dataclass
class _Failed:
    key: int
    reason: str


class _WorkerExit:
    pass


_Message = _Chunk | _Done | _Failed | _WorkerExit


@dataclass
class _Video:
    """Features of one video as batches come back."""

    source: Source
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    indices: list[np.ndarray] = field(default_factory=list)
    n_embedded: int = 0
    maps: dict[str, list[np.ndarray]] = field(default_factory=dict)
    map_indices: list[np.ndarray] = field(default_factory=list)
    done: VideoDone | None = None
    sha256: str | None = None


def video_meta(source: Source, done: VideoDone, sha256: str, subsampled: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "source": str(source.path),
        "source_sha256": sha256,
        "n_frames": done.n_frames,
        "fps": done.fps,
        "width": done.width,
        "height": done.height,
        "codec": done.codec,
    }
    if subsampled:
        meta["frame_indices"] = done.frame_indices.tolist()
    if done.times_estimated:
        meta["times_estimated"] = done.times_estimated
    return meta


def stream_times(done: VideoDone, streams: Sequence[str]) -> dict[str, list[float]]:
    """Per stream the presentation time of every stored row (the kept frames')."""
    if done.frame_times is None:
        return {}
    times = done.frame_times.tolist()
    return {s: times for s in streams}


class _Writer(threading.Thread):
    """Writes finished videos (and failures) to the store, in order, off the main thread."""

    def __init__(
        self, store: FeatureStore, summary: ExtractionSummary, progress: ExtractProgress
    ) -> None:
        super().__init__(name="framepool-writer", daemon=True)
        self.store = store
        self.summary = summary
        self.progress = progress
        self.jobs: queue.Queue[tuple[str, Source, Any] | None] = queue.Queue()
        self.lock = threading.Lock()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            kind, source, payload = job
            if kind == "write":
                written = self._write(source, *payload)
            else:
                self._fail(source, payload)
                written = False
            if written:
                self.progress.video_done()
            else:
                self.progress.video_failed()

    def _write(
        self, source: Source, streams: dict[str, np.ndarray], meta: dict[str, Any], n: int
    ) -> bool:
        vid = source.video_id
        try:
            store_video(self.store, source, streams, meta, n)
        except Exception as exc:
            log.exception("writing %s failed", vid)
            self._fail(source, f"{str(source.path)!r}: could not write its features: {exc}")
            return False
        with self.lock:
            self.summary.complete.append(vid)
            self.summary.frames += n
        return True

    def _fail(self, source: Source, reason: str) -> None:
        with self.lock:
            self.summary.failed[source.video_id] = reason
        record_failure(self.store, source, reason)

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()


def _keep_times(meta: dict[str, Any], name: str) -> None:
    """A kept stream has the rows of the streams written with it: the same times."""
    times = meta.get("times")
    if times and name not in times:
        times[name] = next(iter(times.values()))


def store_video(
    store: FeatureStore,
    source: Source,
    streams: dict[str, np.ndarray],
    meta: dict[str, Any],
    n: int,
) -> None:
    """Write one finished video (``n`` kept frames) and mark it complete; a video already
    complete with other streams keeps them (its streams of the same length, its maps)."""
    vid = source.video_id
    if store.status(vid) == "complete":  # adding streams: keep the others
        for name in store.streams(vid):
            if name not in streams and store.n_frames(vid, name) == n:
                streams[name] = store.read(vid, name, dtype=np.float16)
                _keep_times(meta, name)
        _keep_maps(store, vid, streams, meta)
    store.write_video(
        vid, streams, label=source.label, split=source.split, group=source.group, meta=meta
    )


def record_failure(store: FeatureStore, source: Source, reason: str) -> None:
    """Mark ``source`` failed with ``reason`` (logged, never raised, when even that fails)."""
    try:
        store.mark_failed(
            source.video_id,
            reason,
            label=source.label,
            split=source.split,
            group=source.group,
            meta={"source": str(source.path)},
        )
    except Exception:
        log.exception("could not record the failure of %s", source.video_id)


def _keep_maps(
    store: FeatureStore, vid: str, streams: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    """Carry a complete video's map streams (and their frame indices) into its rewrite when the
    new write does not replace them: their frames are recorded, not tied to the new T."""
    if "map_frame_indices" in meta:
        return
    old = store.video_attrs(vid)
    kept = [
        name
        for name in store.streams(vid)
        if name.endswith("_map") and name not in streams and "map_frame_indices" in old
    ]
    for name in kept:
        streams[name] = store.read(vid, name, dtype=np.float16)
    if kept:
        meta["map_frame_indices"] = old["map_frame_indices"]
        meta["map_stride"] = old.get("map_stride")


def todo_sources(
    store: FeatureStore,
    sources: Sequence[Source],
    streams: Sequence[str],
    shard: tuple[int, int] | None,
    summary: ExtractionSummary,
) -> list[Source]:
    todo = []
    for src in sources:
        if not in_shard(src.video_id, shard):
            summary.outside_shard += 1
            continue
        if store.status(src.video_id) == "complete" and set(streams) <= set(
            store.streams(src.video_id)
        ):
            summary.skipped.append(src.video_id)
            continue
        todo.append(src)
    return todo


def run_extraction(
    sources: Sequence[Source],
    store: str | Path,
    extractor: FeatureExtractor,
    *,
    workers: int = 2,
    shard: tuple[int, int] | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    progress: bool = True,
    queue_frames: int | None = None,
    decoder: str = "auto",
    progress_interval: float = DEFAULT_INTERVAL,
    sample_fps: float | None = None,
) -> ExtractionSummary:
    """Extract ``sources`` into the store at ``store`` (created if needed) with ``extractor``.

    ``workers`` threads prepare videos; the calling thread runs the model on batches of
    ``extractor.batch_size`` frames; a writer thread stores finished videos. ``queue_frames``
    bounds the prepared frames waiting for the model (default: 2 batches + one chunk per worker).
    ``sample_fps`` keeps the frames shown at that rate (:func:`extractor.prepare.select_at_fps`).
    ``decoder`` (``auto``, ``pyav``, ``torchcodec``): see
    :func:`extractor.decode_torchcodec.resolve_decoder`; each worker decodes with its own decoder.
    ``progress``: a bar on a terminal, else a plain line every ``progress_interval`` seconds on
    stderr (:class:`extractor.progress.ExtractProgress`).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    check_selection(stride, max_frames)
    read_frames = make_frame_reader(decoder, extractor.device)
    ids = [s.video_id for s in sources]
    if len(set(ids)) != len(ids):
        raise ValueError("video ids are not unique; build sources with make_sources")
    start = time.perf_counter()
    class_names = sorted({s.label for s in sources if s.label is not None})
    fstore = FeatureStore.create(store, extractor=extractor.config(), class_names=class_names)
    summary = ExtractionSummary(store=str(store))
    todo = todo_sources(fstore, sources, extractor.streams + extractor.map_streams, shard, summary)
    if todo:
        log.info(
            "extracting %d videos (%d already complete, %d in other shards) into %s",
            len(todo),
            len(summary.skipped),
            summary.outside_shard,
            store,
        )
        bound = queue_frames or 2 * extractor.batch_size + _CHUNK_FRAMES * workers
        preparers = _Preparers(
            todo,
            extractor,
            stride=stride,
            max_frames=max_frames,
            read_frames=read_frames,
            queue_chunks=max(1, bound // _CHUNK_FRAMES),
            sample_fps=sample_fps,
        )
        shown = ExtractProgress(len(todo), enabled=progress, interval=progress_interval)
        writer = _Writer(fstore, summary, shown)
        subsampled = stride > 1 or max_frames is not None or sample_fps is not None
        batcher = _Batcher(todo, extractor, writer, subsampled=subsampled)
        writer.start()
        try:
            preparers.start(min(workers, len(todo)))
            batcher.consume(preparers)
        finally:
            preparers.stop()
            writer.finish()
            shown.close()
    summary.seconds = time.perf_counter() - start
    summary.complete.sort()
    summary.skipped.sort()
    return summary


_CHUNK_FRAMES = 8  # frames per message from a preparing thread


class _Preparers:
    """The threads that decode and prepare videos (each takes the next video to do) and the
    bounded queue of chunks, ends and failures they send to the model's thread."""

    def __init__(
        self,
        todo: Sequence[Source],
        extractor: FeatureExtractor,
        *,
        stride: int,
        max_frames: int | None,
        read_frames: FrameReader,
        queue_chunks: int,
        sample_fps: float | None = None,
    ) -> None:
        self.sample_fps = sample_fps
        self.todo = todo
        self.extractor = extractor
        self.stride = stride
        self.max_frames = max_frames
        self.read_frames = read_frames
        self.items: queue.Queue[_Message] = queue.Queue(maxsize=queue_chunks)
        self.keys: queue.Queue[int] = queue.Queue()
        for key in range(len(todo)):
            self.keys.put(key)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, n: int) -> None:
        self.threads = [
            threading.Thread(target=self._work, name=f"framepool-prepare-{i}", daemon=True)
            for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()

    def messages(self) -> Iterator[_Chunk | _Done | _Failed]:
        """What the threads send, until every one of them has exited."""
        exited = 0
        while exited < len(self.threads):
            msg = self.items.get()
            if isinstance(msg, _WorkerExit):
                exited += 1
            else:
                yield msg

    def _put(self, msg: _Message) -> bool:
        while not self.stopping.is_set():
            try:
                self.items.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        # Parallelism comes from the workers: torch ops in this thread (the resize) stay on it
        # instead of starting an OpenMP team that competes with the model's.
        torch.set_num_threads(1)
        flow = self.extractor.flow.clone() if self.extractor.flow is not None else None
        while not self.stopping.is_set():
            try:
                key = self.keys.get_nowait()
            except queue.Empty:
                break
            path = self.todo[key].path
            try:
                if not self._prepare(key, path, flow):
                    return
            except VideoError as exc:
                self._put(_Failed(key, str(exc)))
            except Exception as exc:
                log.exception("preparing %s failed", path)
                self._put(_Failed(key, f"{str(path)!r}: {type(exc).__name__}: {exc}"))
        self._put(_WorkerExit())

    def _prepare(self, key: int, path: str | Path, flow: FlowBackend | None) -> bool:
        """Send one video's chunks and its end; False once the run is stopping."""
        for item in prepare_video(
            path,
            streams=self.extractor.streams,
            flow=flow,
            stride=self.stride,
            max_frames=self.max_frames,
            chunk_size=_CHUNK_FRAMES,
            should_stop=self.stopping.is_set,
            appearance_input=self.extractor.appearance_input,
            read_frames=self.read_frames,
            sample_fps=self.sample_fps,
        ):
            if isinstance(item, VideoDone):
                msg: _Message = _Done(key, item, sha256_file(path))
            else:
                msg = _Chunk(key, item)
            if not self._put(msg):
                return False
        return True


class _Batcher:
    """The model's side: gathers prepared frames into batches of ``extractor.batch_size`` that
    cross video boundaries, files each batch's features under their videos, and hands a video to
    the writer once all its frames are back."""

    def __init__(
        self,
        todo: Sequence[Source],
        extractor: FeatureExtractor,
        writer: _Writer,
        *,
        subsampled: bool,
    ) -> None:
        self.todo = todo
        self.extractor = extractor
        self.writer = writer
        self.subsampled = subsampled
        self.videos: dict[int, _Video] = {}
        self.dead: set[int] = set()
        self.pending: list[tuple[int, FrameChunk]] = []
        self.n_pending = 0

    def consume(self, preparers: _Preparers) -> None:
        """Run every message of the preparing threads through the model and to the writer."""
        for msg in preparers.messages():
            if isinstance(msg, _Chunk):
                self.add_chunk(msg.key, msg.chunk)
            elif isinstance(msg, _Done):
                self.end_video(msg.key, msg.done, msg.sha256)
            else:
                self.fail_video(msg.key, msg.reason)
        if self.n_pending:
            self.run_batch(self.n_pending)
        if self.videos:  # internal invariant: every video ended with Done or Failed
            raise AssertionError(f"videos left unfinished: {sorted(self.videos)}")

    def add_chunk(self, key: int, chunk: FrameChunk) -> None:
        if key in self.dead:
            return
        self.videos.setdefault(key, _Video(self.todo[key]))
        self.pending.append((key, chunk))
        self.n_pending += len(chunk)
        while self.n_pending >= self.extractor.batch_size:
            self.run_batch(self.extractor.batch_size)

    def end_video(self, key: int, done: VideoDone, sha256: str) -> None:
        v = self.videos.setdefault(key, _Video(self.todo[key]))
        v.done, v.sha256 = done, sha256
        self.finish_if_done(key)

    def fail_video(self, key: int, reason: str) -> None:
        self.dead.add(key)
        self.videos.pop(key, None)
        self.pending = [(k, c) for k, c in self.pending if k != key]
        self.n_pending = sum(len(c) for _, c in self.pending)
        self.writer.jobs.put(("fail", self.todo[key], reason))

    def take(self, n: int) -> list[tuple[int, FrameChunk]]:
        """The first ``n`` pending frames (the last chunk split if need be)."""
        taken: list[tuple[int, FrameChunk]] = []
        count = 0
        while count < n:
            key, chunk = self.pending[0]
            need = n - count
            if len(chunk) <= need:
                self.pending.pop(0)
                taken.append((key, chunk))
                count += len(chunk)
            else:
                taken.append((key, _slice(chunk, 0, need)))
                self.pending[0] = (key, _slice(chunk, need, len(chunk)))
                count += need
        self.n_pending -= count
        return taken

    def run_batch(self, n: int) -> None:
        """Embed the first ``n`` pending frames and file their features under their videos."""
        ex = self.extractor
        taken = self.take(n)
        batch = {s: np.concatenate([getattr(c, s) for _, c in taken]) for s in ex.streams}
        maps: dict[str, np.ndarray] = {}
        if ex.map_streams:
            out, maps = _embed_maps(ex, batch, taken, self.videos)
        else:
            out = ex.embed(batch)
        row = 0
        for key, c in taken:
            v = self.videos.get(key)
            if v is not None:
                for s in ex.streams:
                    v.parts.setdefault(s, []).append(out[s][row : row + len(c)])
                if ex.map_streams:
                    _add_maps(v, c, maps, ex.map_stride)
                v.indices.append(c.indices)
                v.n_embedded += len(c)
            row += len(c)
        self.writer.progress.frames(n)
        for key in {k for k, _ in taken}:
            self.finish_if_done(key)

    def finish_if_done(self, key: int) -> None:
        """Hand video ``key`` to the writer once it has ended and all its frames are embedded."""
        v = self.videos.get(key)
        if v is None or v.done is None or v.n_embedded < len(v.done.frame_indices):
            return
        del self.videos[key]
        order = np.argsort(np.concatenate(v.indices), kind="stable")
        feats = {s: np.concatenate(v.parts[s])[order] for s in self.extractor.streams}
        got = np.concatenate(v.indices)[order]
        if not np.array_equal(got, v.done.frame_indices):  # internal invariant
            raise AssertionError(f"{v.source.video_id}: frames {got} != {v.done.frame_indices}")
        assert v.sha256 is not None
        meta = video_meta(v.source, v.done, v.sha256, self.subsampled)
        meta["times"] = stream_times(v.done, self.extractor.streams)
        if self.extractor.map_streams:
            names, stride = self.extractor.map_streams, self.extractor.map_stride
            feats.update(_video_maps(v, names, stride, meta))
        self.writer.jobs.put(("write", v.source, (feats, meta, len(got))))


def _map_positions(first: int, n: int, stride: int) -> np.ndarray:
    """Rows (0..n-1) of ``n`` frames of a video, its ``first``-th embedded frame on, whose maps
    are kept.

    A video's frames reach the model in order (one worker prepares it, the queue and the pending
    list are FIFO), so its k-th embedded frame is its k-th kept frame.
    """
    return np.flatnonzero((first + np.arange(n)) % stride == 0)


def _embed_maps(
    extractor: FeatureExtractor,
    batch: dict[str, np.ndarray],
    taken: list[tuple[int, FrameChunk]],
    videos: dict[int, _Video],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rows, start = [], 0
    embedded: dict[int, int] = {}  # a video may have several chunks in one batch
    for key, c in taken:
        v = videos.get(key)
        if v is not None:
            first = embedded.setdefault(key, v.n_embedded)
            rows.append(start + _map_positions(first, len(c), extractor.map_stride))
            embedded[key] = first + len(c)
        start += len(c)
    picked = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return extractor.embed_with_maps(batch, picked)


def _add_maps(v: _Video, c: FrameChunk, maps: dict[str, np.ndarray], stride: int) -> None:
    """Move this chunk's kept maps (the first rows of ``maps``, consumed) into the video."""
    keep = _map_positions(v.n_embedded, len(c), stride)
    for name in list(maps):
        v.maps.setdefault(name, []).append(maps[name][: len(keep)])
        maps[name] = maps[name][len(keep) :]
    v.map_indices.append(c.indices[keep])


def _video_maps(
    v: _Video, names: Sequence[str], stride: int, meta: dict[str, Any]
) -> dict[str, np.ndarray]:
    """A finished video's map streams ``[T', h, w, C]``; records their frames in ``meta``."""
    assert v.done is not None
    frames = np.concatenate(v.map_indices)
    if not np.array_equal(frames, v.done.frame_indices[::stride]):  # internal invariant
        raise AssertionError(f"{v.source.video_id}: map frames {frames} out of order")
    meta["map_frame_indices"] = frames.tolist()
    meta["map_stride"] = stride
    if v.done.frame_times is not None:
        for name in names:
            meta.setdefault("times", {})[name] = v.done.frame_times[::stride].tolist()
    return {name: np.concatenate(v.maps[name]) for name in names}


def _slice(chunk: FrameChunk, a: int, b: int) -> FrameChunk:
    return FrameChunk(
        indices=chunk.indices[a:b],
        appearance=chunk.appearance[a:b] if chunk.appearance is not None else None,
        motion=chunk.motion[a:b] if chunk.motion is not None else None,
    )


def run_extract(
    inputs: Sequence[str | Path],
    store: str | Path,
    spec: BackboneSpec | None = None,
    *,
    maps: Sequence[str] = (),
    labels: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 2,
    shard: str | tuple[int, int] | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    progress: bool = True,
    map_dim: int | None = None,
    map_stride: int = 1,
    map_seed: int = 0,
    decoder: str = "auto",
    progress_interval: float = DEFAULT_INTERVAL,
    sample_fps: float | None = None,
    window_stride: int | None = None,
    engine: str = "local",
    ray: RayOptions | None = None,
) -> ExtractionSummary:
    """``framepool extract`` as a function: expand inputs, build the extractor, run the pipeline.

    ``engine``: ``local`` (this process: decode threads, the model, a writer thread) or ``ray``
    (a Ray Data pipeline on a cluster, :mod:`extractor.ray_engine`, set up by ``ray``; needs
    ``pip install "framepool[ray]"``; ``workers`` and ``decoder`` then do not apply: CPU tasks
    decode with PyAV, as many as the cluster holds).

    ``spec`` (default: :class:`~extractor.spec.BackboneSpec`'s defaults) says which backbones,
    flow and dtype compute the features; ``batch_size`` frames go through the model at once and
    ``workers`` threads decode. ``decoder``: ``auto`` (torchcodec with NVDEC when ``device`` is
    CUDA, else PyAV), ``pyav`` or ``torchcodec``. ``progress``: see :func:`run_extraction`.

    ``shard`` is ``"I/N"`` or ``(I, N)``; without it, torchrun's ``RANK``/``WORLD_SIZE`` are used
    when set. Raises ValueError/FileNotFoundError for unusable arguments (bad shard, missing
    weights, an extractor that differs from the store's); per-video problems are in the summary.

    ``maps`` names map streams (``appearance_map``, ``motion_map``): the source stream's spatial
    maps from the same forward pass (the source stream is then extracted too), reduced to
    ``map_dim`` channels by a random projection seeded with ``map_seed`` and kept every
    ``map_stride`` extracted frames (see :meth:`FeatureExtractor.set_maps`).

    ``sample_fps`` keeps, for each instant k / F from the first frame, the frame shown then
    (instead of ``stride`` / ``max_frames``); every stored row's presentation time is recorded.

    ``spec.arch = "hf:<model>"`` is a window backbone (:mod:`extractor.windows`): one row per
    window of the model's frame count, window starts ``window_stride`` kept frames apart.
    """
    spec = spec if spec is not None else BackboneSpec()
    bad = [m for m in maps if m not in MAP_STREAMS]
    if bad:
        raise ValueError(f"maps must be among {list(MAP_STREAMS)}, got {bad}")
    wanted = dict.fromkeys([*spec.streams, *(MAP_STREAMS[m] for m in maps)])
    streams = tuple(s for s in STREAMS if s in wanted) + tuple(
        s for s in wanted if s not in STREAMS
    )
    check_selection(stride, max_frames)
    if sample_fps is not None and (stride != 1 or max_frames is not None):
        raise ValueError("sample_fps replaces stride and max_frames; give one or the other")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    part = parse_shard(shard) if isinstance(shard, str) else shard
    if part is None:
        part = shard_from_env()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if not maps and (map_dim is not None or map_stride != 1):
        raise ValueError("map_dim and map_stride apply only when a map stream is requested")
    sources = make_sources(inputs, labels=labels)
    if spec.arch.startswith("hf:"):
        if engine != "local":
            raise ValueError(f"arch {spec.arch}: window backbones run on the local engine only")
        return _run_windows(sources, store, spec, device, batch_size, part, stride, max_frames,
                            maps, progress, sample_fps, window_stride)  # fmt: skip
    if window_stride is not None:
        raise ValueError("window_stride applies to window backbones (arch hf:<model>) only")
    if engine == "ray":
        from extractor.ray_engine import run_extraction_ray

        return run_extraction_ray(
            sources,
            store,
            replace(spec, streams=streams),
            maps=tuple(maps),
            map_dim=map_dim,
            map_stride=map_stride,
            map_seed=map_seed,
            device=device,
            batch_size=batch_size,
            shard=part,
            stride=stride,
            max_frames=max_frames,
            sample_fps=sample_fps,
            progress=progress,
            progress_interval=progress_interval,
            options=ray,
        )
    extractor = FeatureExtractor(
        replace(spec, streams=streams), device=device, batch_size=batch_size
    )
    if maps or map_dim is not None or map_stride != 1:
        if not maps:
            raise ValueError("map_dim and map_stride apply only when a map stream is requested")
        extractor.set_maps(maps, dim=map_dim, stride=map_stride, seed=map_seed)
    return run_extraction(
        sources,
        store,
        extractor,
        workers=workers,
        shard=part,
        stride=stride,
        max_frames=max_frames,
        progress=progress,
        decoder=decoder,
        progress_interval=progress_interval,
        sample_fps=sample_fps,
    )


def _run_windows(
    sources: Sequence[Source],
    store: str | Path,
    spec: BackboneSpec,
    device: str,
    batch_size: int,
    shard: tuple[int, int] | None,
    stride: int,
    max_frames: int | None,
    maps: Sequence[str],
    progress: bool,
    sample_fps: float | None,
    window_stride: int | None,
) -> ExtractionSummary:
    """:func:`run_extract` with a window backbone (:mod:`extractor.windows`)."""
    from extractor.windows import WindowExtractor, run_window_extraction

    if tuple(spec.streams) != ("appearance",) or maps:
        raise ValueError(f"--arch {spec.arch} computes the appearance stream only")
    if stride != 1 or max_frames is not None:
        raise ValueError(f"--arch {spec.arch}: windows cover every frame; use --fps to sample")
    extractor = WindowExtractor(
        spec.arch,
        spec.weights,
        window_stride=window_stride,
        device=device,
        batch_size=max(1, batch_size // 8),  # batch_size counts frames; a window holds several
        seed=spec.seed,
    )
    return cast(
        ExtractionSummary,
        run_window_extraction(
            sources, store, extractor, shard=shard, sample_fps=sample_fps, progress=progress
        ),
    )
