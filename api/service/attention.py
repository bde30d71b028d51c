"""Where in its frames a map head (``stpn``) looks: its spatial attention over one upload.

The upload is decoded and extracted as for a prediction (the same frames, the run's own
extractor with its map streams), then the head's attention weights over the cells of every map
frame are read out. Heads without spatial attention have none to give.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from api.service.served_runs import JobControl, JobStopped, Limits, LoadedRun, WorkerContext
from extractor.features import FeatureExtractor


@dataclass(frozen=True)
class AttentionMaps:
    """``weights [T', h, w]``: the attention over the cells of the map frames ``frames`` (indices
    among the decoded frames)."""

    frames: list[int]
    weights: np.ndarray
    n_frames: int


def has_attention(run: LoadedRun) -> bool:
    """Whether the run's head gives spatial attention weights (a map run: ``stpn``)."""
    return callable(getattr(run.predictor, "attention", None)) and bool(
        getattr(run.predictor, "extractor_streams", None)
    )


def attention_maps(
    ctx: WorkerContext,
    run: LoadedRun,
    path: Path,
    *,
    stride: int,
    max_frames: int | None,
    limits: Limits | None = None,
    control: JobControl | None = None,
) -> AttentionMaps:
    """The head's attention over ``path``'s map frames (runs in an inference worker).

    Raises the extractor's ``VideoError`` for a file it cannot decode, ``VideoTooLarge`` over
    ``limits``, :class:`JobStopped` when ``control`` stops the job, and ``ValueError`` for a run
    without spatial attention.
    """
    if not has_attention(run):
        raise ValueError(f"model {run.run_id!r} ({run.predictor.head}) has no spatial attention")
    control = control or JobControl()
    control.start()
    extractor = ctx.extractors[run.extractor_key]
    if not isinstance(extractor, FeatureExtractor):  # window backbones keep no spatial maps
        raise ValueError(f"model {run.run_id!r} has no spatial maps to attend over")
    try:
        video = extractor.extract_file(
            path,
            stride=stride,
            max_frames=max_frames,
            should_stop=control.should_stop,
            maps=True,
            max_decoded_frames=None if limits is None else limits.max_decoded_frames,
            max_frame_pixels=None if limits is None else limits.max_frame_pixels,
        )
    except InterruptedError:
        raise JobStopped(control.reason or "stopped") from None
    features: Mapping[str, np.ndarray] = {s: video.features[s] for s in run.predictor.streams}
    weights = np.asarray(run.predictor.attention(features), dtype=np.float64)  # type: ignore[attr-defined]
    frames = video.frame_indices[:: int(extractor.map_stride)]
    if len(frames) != weights.shape[0]:
        raise AssertionError(f"{weights.shape[0]} attention maps for {len(frames)} map frames")
    return AttentionMaps(
        frames=[int(f) for f in frames], weights=weights, n_frames=int(video.n_frames)
    )
