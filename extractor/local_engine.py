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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extractor.decode import VideoError
from extractor.decode_torchcodec import FrameReader, make_frame_reader
from extractor.features import FeatureExtractor
from extractor.flow import FlowBackend, sha256_file
from extractor.prepare import FrameChunk, VideoDone, check_selection, prepare_video
from extractor.progress import DEFAULT_INTERVAL, ExtractProgress
from extractor.records import (
    ExtractionSummary,
    record_failure,
    store_video,
    stream_times,
    todo_sources,
    video_meta,
)
from extractor.sources import Source
from storage import FeatureStore

log = logging.getLogger(__name__)


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
