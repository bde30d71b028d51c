"""Padded batches of spatial map streams for the heads that read maps (``stpn``).

A map stream holds ``[T', h, w, C]`` float16 per video (the last convolutional block's output at a
recorded frame stride, see :meth:`extractor.features.FeatureExtractor.set_maps`). A batch is
``{stream: [B, T'_max, h, w, C]}`` zero-padded, with ``lengths [B]`` and ``mask [B, T'_max]``:
the ragged-batch contract of the frame loader, one rank higher.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aggregator.data import pad_streams
from aggregator.streams import MAP_STREAMS
from storage import FeatureStore

log = logging.getLogger(__name__)


def pick_frames(n: int, max_frames: int | None) -> np.ndarray:
    """Indices of at most ``max_frames`` evenly spaced rows out of ``n`` (all when it is None)."""
    if max_frames is None or n <= max_frames:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, max_frames)).astype(np.int64)


class MapDataset(Dataset[dict[str, Any]]):
    """One item per video: ``{"features": {stream: [T', h, w, C] float16}, "label", "video_id"}``.

    ``max_frames`` keeps at most that many evenly spaced map frames of a video; ``in_memory``
    keeps every video read (float16) for the next epochs.
    """

    def __init__(
        self,
        store: FeatureStore,
        video_ids: Sequence[str],
        streams: Sequence[str] = MAP_STREAMS,
        labels: np.ndarray | None = None,
        *,
        max_frames: int | None = None,
        in_memory: bool = False,
    ) -> None:
        if labels is not None and len(labels) != len(video_ids):
            raise ValueError(f"{len(video_ids)} videos but {len(labels)} labels")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.store = store
        self.video_ids = list(video_ids)
        self.streams = list(streams)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.max_frames = max_frames
        self.in_memory = in_memory
        self._held: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.video_ids)

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        vid = self.video_ids[i]
        out = {}
        for s in self.streams:
            x = self.store.read(vid, s, dtype=np.float16)
            if x.ndim != 4:
                raise ValueError(
                    f"video {vid!r}: stream {s!r} is {x.shape}, not a [T', h, w, C] map"
                )
            out[s] = torch.from_numpy(np.ascontiguousarray(x[pick_frames(len(x), self.max_frames)]))
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        feats = self._held.get(i)
        if feats is None:
            feats = self._read(i)
            if self.in_memory:
                self._held[i] = feats
        return {
            "features": feats,
            "label": -1 if self.labels is None else int(self.labels[i]),
            "video_id": self.video_ids[i],
        }


@dataclass
class MapBatch:
    """``{stream: [B, T, h, w, C]}`` zero-padded maps, ``lengths [B]``, ``mask [B, T]``."""

    features: dict[str, torch.Tensor]
    lengths: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    video_ids: list[str]


def pad_maps(items: Sequence[Mapping[str, Any]], dtype: torch.dtype = torch.float32) -> MapBatch:
    """Stack videos with different numbers of map frames into one zero-padded batch."""
    b = pad_streams(items, dtype)
    return MapBatch(b.features, b.lengths, b.mask, b.labels, b.video_ids)


def map_loader(
    dataset: MapDataset,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader[dict[str, Any]]:
    """A DataLoader of :class:`MapBatch` es (seeded shuffling)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=pad_maps,
    )
