"""What the fine-tuning loop trains on: the training videos (:class:`TrainVideo`) and where their
inputs come from (:class:`VideoSource`), shared by the loop, the spatial-map wrappers and the
decoded-video sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from aggregator.finetune.surrogate import Frames


@dataclass(frozen=True)
class TrainVideo:
    video_id: str
    label: int


class VideoSource(Protocol):
    """Where a training video's inputs (and optional precomputed features) come from.

    A source may also have ``remember(video_id, features: {stream: [T, d]})``: the loop then
    hands it every video's features after its step (see
    :class:`aggregator.finetune.inputs.FeatureMemory`).
    """

    def frames(self, video_id: str) -> dict[str, Frames]:
        """Per stream the video's backbone inputs (loaded chunk by chunk on the device)."""
        ...

    def known(self, video_id: str) -> dict[str, torch.Tensor] | None:
        """Per stream ``[T, d]`` features for the frames outside the subset, or None."""
        ...
