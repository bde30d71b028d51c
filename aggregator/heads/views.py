"""What a trained model shows of itself: learned node weights, fusion weights, and which streams
take pyramid nodes as leaves. Read by the trainers' reports and by a loaded run alike."""

from __future__ import annotations

import numpy as np

from aggregator.heads import TemporalPyramid, TwoStream, VideoModel

__all__ = ["fusion_weights_of", "model_beta_matrices", "model_betas", "pyramid_leaf_streams"]


def model_betas(model: VideoModel) -> dict[str, list[list[float]]]:
    """``{stream: beta level by level}`` for the streams whose head learns node weights."""
    out: dict[str, list[list[float]]] = {}
    if isinstance(model, TwoStream):
        for s in model.streams:
            head = model.stream_head(s)
            if isinstance(head, TemporalPyramid):
                out[s] = head.beta()
    return out


def model_beta_matrices(model: VideoModel) -> dict[str, np.ndarray]:
    """``{stream: [P, M] beta}`` for the plot."""
    out: dict[str, np.ndarray] = {}
    if isinstance(model, TwoStream):
        for s in model.streams:
            head = model.stream_head(s)
            if isinstance(head, TemporalPyramid):
                out[s] = head.beta_matrix().double().numpy()
    return out


def fusion_weights_of(model: VideoModel) -> dict[str, float] | None:
    return model.fusion_weights() if isinstance(model, TwoStream) else None


def pyramid_leaf_streams(model: VideoModel) -> list[str]:
    """Streams whose head takes pyramid nodes as :class:`PyramidLeaves` (the temporal pyramid)."""
    if not isinstance(model, TwoStream):
        return []
    return [s for s in model.streams if isinstance(model.stream_head(s), TemporalPyramid)]
