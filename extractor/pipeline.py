"""``framepool extract`` as a function: check the options, expand the inputs, and hand the run to
one engine.

Engines: the local pipeline (:mod:`extractor.local_engine`: decode threads, the model, a writer
thread), the Ray Data pipeline (:mod:`extractor.ray_engine`) and, for window backbones, the window
extractor (:mod:`extractor.windows`). Every engine writes and summarises videos through
:mod:`extractor.records`, and none of them imports this module: the dispatch runs one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from extractor.backbones import STREAMS
from extractor.features import MAP_STREAMS, FeatureExtractor
from extractor.local_engine import run_extraction
from extractor.prepare import check_selection
from extractor.progress import DEFAULT_INTERVAL
from extractor.records import ExtractionSummary
from extractor.sharding import parse_shard, shard_from_env
from extractor.sources import Source, make_sources
from extractor.spec import BackboneSpec

if TYPE_CHECKING:
    from extractor.ray_engine import RayOptions

ENGINES = ("local", "ray")

__all__ = ["ENGINES", "ExtractionSummary", "run_extract", "run_extraction"]


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
    streams, part = _checked(spec, maps, stride, max_frames, sample_fps, workers, shard, engine,
                             map_dim, map_stride)  # fmt: skip
    sources = make_sources(inputs, labels=labels)
    if spec.arch.startswith("hf:"):
        if engine != "local":
            raise ValueError(f"arch {spec.arch}: window backbones run on the local engine only")
        return _run_windows(sources, store, spec, device, batch_size, part, stride, max_frames,
                            maps, progress, sample_fps, window_stride)  # fmt: skip
    if window_stride is not None:
        raise ValueError("window_stride applies to window backbones (arch hf:<model>) only")
    if engine == "ray":
        return _run_ray(sources, store, replace(spec, streams=streams), maps, map_dim, map_stride,
                        map_seed, device, batch_size, part, stride, max_frames, sample_fps,
                        progress, progress_interval, ray)  # fmt: skip
    extractor = FeatureExtractor(
        replace(spec, streams=streams), device=device, batch_size=batch_size
    )
    if maps:
        extractor.set_maps(maps, dim=map_dim, stride=map_stride, seed=map_seed)
    return run_extraction(sources, store, extractor, workers=workers, shard=part, stride=stride,
                          max_frames=max_frames, progress=progress, decoder=decoder,
                          progress_interval=progress_interval, sample_fps=sample_fps)  # fmt: skip


def _checked(
    spec: BackboneSpec,
    maps: Sequence[str],
    stride: int,
    max_frames: int | None,
    sample_fps: float | None,
    workers: int,
    shard: str | tuple[int, int] | None,
    engine: str,
    map_dim: int | None,
    map_stride: int,
) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """The streams to extract (pooled ones in :data:`STREAMS` order, then maps) and the shard of
    :func:`run_extract`'s options; ValueError naming the first option that cannot be used."""
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
    return streams, part


def _run_ray(
    sources: Sequence[Source],
    store: str | Path,
    spec: BackboneSpec,
    maps: Sequence[str],
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
    options: RayOptions | None,
) -> ExtractionSummary:
    """:func:`run_extract` on a Ray cluster (:mod:`extractor.ray_engine`, imported only here:
    Ray is an optional dependency)."""
    from extractor.ray_engine import run_extraction_ray

    return run_extraction_ray(
        sources,
        store,
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
