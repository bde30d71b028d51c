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
when this engine runs. This module is the driver; the stages the workers run are in
:mod:`extractor.ray_stages`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from extractor.prepare import check_selection
from extractor.progress import DEFAULT_INTERVAL, ExtractProgress
from extractor.ray_stages import (
    EmbedVideos,
    ModelSpec,
    Plan,
    build_extractor,
    prepare_videos,
    source_row,
    write_videos,
)
from extractor.sources import Source
from extractor.spec import BackboneSpec
from extractor.transforms import AppearanceInput

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


def _recorded_config(ray: Any, model: ModelSpec, gpus: float) -> dict[str, Any]:
    """The extractor config the actors will compute (built where they run: a GPU's dtype may
    differ from this machine's)."""
    if gpus == 0:
        config = build_extractor(model).config()
    else:
        task = ray.remote(_config_of).options(num_gpus=gpus, num_cpus=1)
        config = ray.get(task.remote(model))
    return dict(json.loads(json.dumps(config)))


def _config_of(model: ModelSpec) -> dict[str, Any]:
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
    model = ModelSpec(spec, actor_device, batch_size, maps, map_dim, map_stride, map_seed, {})
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
        plan = Plan(
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
        try:
            _collect(results, summary, bar)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    summary.complete.sort()
    summary.skipped.sort()
    return summary


def _collect(results: Any, summary: ExtractionSummary, bar: ExtractProgress) -> None:
    """Run the pipeline ``results`` and file each video's row in ``summary`` and on ``bar``."""
    seen: set[str] = set()
    for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
        for vid, status, frames, error in zip(
            batch["video_id"], batch["status"], batch["frames"], batch["error"], strict=True
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


def _appearance_input(config: Mapping[str, Any]) -> AppearanceInput:
    from extractor.features import _recorded_appearance_input

    if "appearance" not in config:
        return AppearanceInput()
    return _recorded_appearance_input(config["appearance"])


def _dataset(
    ray: Any,
    todo: Sequence[Source],
    plan: Plan,
    model: ModelSpec,
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
    items = [source_row(i, s) for i, s in enumerate(todo)]
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
