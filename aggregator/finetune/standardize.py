"""Input standardisation of a fine-tuned head, fitted on its training videos.

``framepool train`` standardises every stream's summaries with statistics of the training split,
held as buffers of the model (:class:`aggregator.heads.standardize.InputStandardizer`). A
fine-tuning run does the same before its first step: the starting backbones (no gradient, eval
mode) compute every training video's frame features (or the store's features are taken where the
source knows them), the head pools them into the summaries it reads, and the per-feature mean and
standard deviation of those summaries over the training videos become the head's statistics.
They are fixed for the run (the backbones move, the transform does not), saved with the head in
``model.pt`` and the checkpoint, and applied by ``evaluate`` and the service like a trained
run's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from aggregator.finetune.surrogate import FinetuneModel, batch_surrogate_features
from aggregator.heads import TwoStream
from aggregator.heads.standardize import RunningMoments

log = logging.getLogger(__name__)


@torch.no_grad()
def head_statistics(
    model: FinetuneModel, source: Any, video_ids: Sequence[str], *, chunk_size: int = 32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per stream, ``(mean [d], std [d])`` of the summaries the head reads, over ``video_ids``
    (their features from the model's current backbones, or from ``source.known``)."""
    head = model.head
    if not isinstance(head, TwoStream):
        raise ValueError(f"the head must be a TwoStream model, got {type(head).__name__}")
    if not video_ids:
        raise ValueError("no training video to compute standardisation statistics from")
    was_training = model.training
    model.eval()
    moments = RunningMoments()
    try:
        for vid in video_ids:
            frames = source.frames(vid)
            known = source.known(vid) or {}
            for s in head.streams:
                f = frames[s]
                feats = batch_surrogate_features(
                    model.backbones[s],
                    [f],
                    [torch.zeros(0, dtype=torch.long)],
                    prepare=model._prepare.get(s),
                    known=[known.get(s)],
                    chunk_size=chunk_size,
                )[0]
                x = feats.float().unsqueeze(0)  # [1, T, d]
                moments.add(
                    s, head.stream_head(s).pool(x, torch.tensor([x.shape[1]], device=x.device))
                )
    finally:
        model.train(was_training)
    return moments.result()


def fit_standardizer(
    model: FinetuneModel, source: Any, video_ids: Sequence[str], *, chunk_size: int = 32
) -> bool:
    """Set the head's standardisation statistics from ``video_ids``; False (nothing done) when
    the head has no standardiser."""
    head = model.head
    if not isinstance(head, TwoStream) or head.standardizer is None:
        return False
    for s, (mean, std) in head_statistics(model, source, video_ids, chunk_size=chunk_size).items():
        head.standardizer.set_statistics(s, mean, std)
    log.info("standardisation statistics from %d training videos", len(video_ids))
    return True
