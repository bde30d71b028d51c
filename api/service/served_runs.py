"""The runs a service answers with, loaded once, and what a worker does with one upload."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.predictor import Predictor
from aggregator.similarity import SimilarityIndex, build_index, has_index, training_split
from api.service.batching import FrameBatcher, Pass

if TYPE_CHECKING:
    from extractor.video_extractor import VideoExtractor

log = logging.getLogger(__name__)

METRIC_KEYS = ("top1", "top5", "mean_class_accuracy", "n_train", "n_test", "seconds")


@dataclass
class LoadedRun:
    """One trained run, ready to answer: its predictor, similarity index and metrics summary."""

    run_id: str
    run_dir: Path
    predictor: Predictor
    index: SimilarityIndex | None
    metrics: dict[str, float | int | None]
    extractor_config: dict[str, Any]

    @property
    def extractor_key(self) -> str:
        return json.dumps(self.extractor_config, sort_keys=True, default=str)


class AmbiguousModel(ValueError):
    """A model name that several loaded runs answer to; ``candidates`` are their ids."""

    def __init__(self, name: str, candidates: list[str]) -> None:
        super().__init__(
            f"model {name!r} names {len(candidates)} loaded runs: {candidates}; give one of "
            "their ids"
        )
        self.candidates = candidates


@dataclass
class Registry:
    """The loaded runs by id; the first one loaded answers requests that name none.

    A request names a run by its id, by its run directory's name, or by its head (``svm``)
    when only one loaded run answers to that name (:meth:`get`).
    """

    runs: dict[str, LoadedRun]
    default_id: str

    def get(self, name: str | None) -> LoadedRun:
        """The run ``name`` names (None: the default run): a run id; else the run whose
        directory is called ``name``; else the run whose head is ``name``. KeyError when none
        is, :class:`AmbiguousModel` when several are."""
        key = self.default_id if name is None else name
        if key in self.runs:
            return self.runs[key]
        for matches in (
            [r for r in self.runs.values() if r.run_dir.name == key],
            [r for r in self.runs.values() if r.predictor.head == key],
        ):
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise AmbiguousModel(key, sorted(r.run_id for r in matches))
        raise KeyError(
            f"model {key!r} is not loaded; give a run id, a run directory's name or a head; "
            f"loaded: {sorted(self.runs)}"
        )

    def names(self) -> list[str]:
        """Every value :meth:`get` accepts: the ids, then the directory names and heads that
        name one run."""
        out = list(self.runs)
        for attr in ("dir", "head"):
            counts: dict[str, int] = {}
            for r in self.runs.values():
                value = r.run_dir.name if attr == "dir" else r.predictor.head
                counts[value] = counts.get(value, 0) + 1
            out += [v for v, n in counts.items() if n == 1 and v not in out]
        return out

    def extractor_configs(self) -> dict[str, dict[str, Any]]:
        """Distinct extractor configurations of the loaded runs, by key."""
        return {run.extractor_key: run.extractor_config for run in self.runs.values()}


@dataclass
class WorkerContext:
    """What an inference worker uses: a feature extractor per distinct extractor config.

    ``FeatureExtractor.extract_file`` is safe to call from several threads (each call has its own
    flow backend), so workers share one set of extractors and the backbones are loaded once.
    """

    extractors: dict[str, VideoExtractor] = field(default_factory=dict)
    batchers: dict[str, FrameBatcher] = field(default_factory=dict)

    def add_batchers(
        self,
        *,
        max_frames: int,
        max_wait_s: float,
        workers: int,
        on_start: Callable[[], None] | None = None,
        on_pass: Callable[[Pass], None] | None = None,
    ) -> None:
        """A :class:`~api.service.batching.FrameBatcher` in front of every frame extractor's
        models, fed by ``workers`` worker threads (window backbones run one upload at a time);
        ``on_start`` and ``on_pass`` as :class:`~api.service.batching.FrameBatcher` takes them."""
        from extractor.features import FeatureExtractor

        for i, (key, extractor) in enumerate(self.extractors.items()):
            if not isinstance(extractor, FeatureExtractor):
                continue
            self.batchers[key] = FrameBatcher(
                extractor.embed,
                max_frames=max_frames,
                max_wait_s=max_wait_s,
                workers=workers,
                name=f"batcher-{i}",
                on_start=on_start,
                on_pass=on_pass,
            )

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()


def metrics_summary(run_dir: Path) -> dict[str, float | int | None]:
    """Scalar test metrics of a run from its ``metrics.json`` (empty when there is none)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out: dict[str, float | int | None] = {}
    for key in METRIC_KEYS:
        value = data.get(key)
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            out[key] = value
    return out


def load_one(run_dir: Path, store: Path | None, device: str = "cpu") -> LoadedRun:
    """Load a run directory; build its similarity index from ``store`` when it has none."""
    from aggregator.run_loader import load_run

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    predictor = load_run(run_dir, device=device)
    index: SimilarityIndex | None = None
    if has_index(run_dir):
        index = SimilarityIndex.load(run_dir)
    elif store is not None:
        log.info("run %s has no similarity index; building it from %s", run_dir, store)
        index = build_index(run_dir, store, training_split(predictor), predictor=predictor)
    else:
        log.warning("run %s has no similarity index; /v1/similar is off for it", run_dir)
    # a map run (stpn) also needs the backbones that compute its maps
    streams = getattr(predictor, "extractor_streams", predictor.streams)
    config = {s: predictor.extractor[s] for s in streams}
    return LoadedRun(
        run_id=predictor.run_id,
        run_dir=run_dir,
        predictor=predictor,
        index=index,
        metrics=metrics_summary(run_dir),
        extractor_config=config,
    )


def load_registry(
    run_dirs: Sequence[Path], store: Path | None = None, device: str = "cpu"
) -> Registry:
    """Load every run once; run ids must be distinct."""
    if not run_dirs:
        raise ValueError("no run directory given; pass at least one --run DIR")
    runs: dict[str, LoadedRun] = {}
    for run_dir in run_dirs:
        run = load_one(Path(run_dir), store, device)
        if run.run_id in runs:
            raise ValueError(
                f"runs {str(runs[run.run_id].run_dir)!r} and {str(run_dir)!r} have the same "
                f"id {run.run_id!r}"
            )
        runs[run.run_id] = run
        log.info(
            "loaded run %s (%s, streams %s)", run.run_id, run.predictor.head, run.predictor.streams
        )
    return Registry(runs=runs, default_id=next(iter(runs)))


def make_worker_context(registry: Registry, device: str) -> WorkerContext:
    """The extractors of every loaded run, rebuilt exactly as their stores recorded them (with
    the map streams a map run reads)."""
    from api.service.maps import extractor_from_config

    return WorkerContext(
        extractors={
            key: extractor_from_config(config, device=device)
            for key, config in registry.extractor_configs().items()
        }
    )


@dataclass(frozen=True)
class Limits:
    """How large a video a worker takes: frames in all, pixels per frame."""

    max_decoded_frames: int
    max_frame_pixels: int


class JobStopped(Exception):
    """A job stopped before its end: it ran past its time limit, or its client went away."""


class JobControl:
    """Shared by a request and its job: the request may cancel it, the job polls
    :meth:`should_stop` at every decoded frame (``frames`` counts them), and the clock of
    ``timeout_s`` starts when the job starts (not while it waits for a worker)."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self._cancelled = threading.Event()
        self._deadline: float | None = None
        self.reason: str | None = None
        self.frames = 0  # calls of should_stop: frames decoded so far (the job's progress)

    def start(self) -> None:
        if self.timeout_s is not None:
            self._deadline = time.monotonic() + self.timeout_s

    def cancel(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._cancelled.set()

    def should_stop(self) -> bool:
        self.frames += 1
        if self._cancelled.is_set():
            return True
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.cancel(
                f"the video took longer than this service's limit of {self.timeout_s:g} s per "
                "video; send a shorter or smaller video, or fewer frames (max_frames, stride)"
            )
            return True
        return False


@dataclass
class Analysis:
    """What a worker found in one uploaded video."""

    proba: np.ndarray | None
    embedding: np.ndarray | None
    n_frames: int
    used: dict[str, int]
    fps: float | None
    width: int
    height: int
    queue_s: float
    decode_extract_s: float
    head_s: float
    times: list[float] | None = None  # presentation time of each row the head saw, seconds


def analyse(
    ctx: WorkerContext,
    run: LoadedRun,
    path: Path,
    *,
    stride: int,
    max_frames: int | None,
    proba: bool,
    embedding: bool,
    submitted_at: float,
    limits: Limits | None = None,
    control: JobControl | None = None,
) -> Analysis:
    """Decode and extract ``path`` with the run's extractor, then apply its head.

    Runs in an inference worker. Decodes the upload once: raises the extractor's ``VideoError``
    for a video it cannot decode, ``VideoTooLarge`` for one over ``limits`` (from the demuxer's
    count before decoding, or at the first frame past them), and :class:`JobStopped` when
    ``control`` stops the job.
    """
    start = time.perf_counter()
    control = control or JobControl()
    control.start()
    extractor = ctx.extractors[run.extractor_key]
    maps = bool(getattr(extractor, "map_streams", ()))  # a map run: maps and vectors at once
    batcher = None if maps else ctx.batchers.get(run.extractor_key)
    try:
        video = extractor.extract_file(
            path,
            stride=stride,
            max_frames=max_frames,
            should_stop=control.should_stop,
            maps=maps,
            max_decoded_frames=None if limits is None else limits.max_decoded_frames,
            max_frame_pixels=None if limits is None else limits.max_frame_pixels,
            **({} if batcher is None else {"embed": batcher.embed}),
        )
    except InterruptedError:
        raise JobStopped(control.reason or "stopped") from None
    features: Mapping[str, np.ndarray] = {s: video.features[s] for s in run.predictor.streams}
    extracted = time.perf_counter()
    p = run.predictor.predict_proba(features) if proba else None
    e = run.predictor.embed(features) if embedding else None
    done = time.perf_counter()
    return Analysis(
        proba=None if p is None else np.asarray(p, dtype=np.float64),
        embedding=None if e is None else np.asarray(e, dtype=np.float32),
        n_frames=int(video.n_frames),
        used={s: int(f.shape[0]) for s, f in features.items()},
        fps=None if video.fps is None else float(video.fps),
        width=int(video.width),
        height=int(video.height),
        queue_s=start - submitted_at,
        decode_extract_s=extracted - start,
        head_s=done - extracted,
        times=_times(getattr(video, "frame_times", None)),
    )


def _times(frame_times: np.ndarray | None) -> list[float] | None:
    """Each used frame's time in seconds (None: an extractor that measures none)."""
    return None if frame_times is None else [float(t) for t in frame_times]
