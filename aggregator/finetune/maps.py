"""Fine-tuning a head that reads spatial maps (``stpn``): backbones that output their last block.

For ``framepool finetune --head stpn`` each ResNet backbone is wrapped in a :class:`MapBackbone`
whose output per frame is the last convolutional block's output ``[h, w, C]`` (7 x 7 at 224),
optionally reduced by the same fixed random projection ``framepool extract --map-dim`` records,
instead of its spatial mean (the pooled vector). The surrogate gradient, chunking and
``--grad-frames`` work on these ``[T, h, w, C]`` features as on vectors: a frame's map depends on
that frame alone (BatchNorm frozen).

The head sees the maps of every ``map_stride``-th frame from the first (:class:`StridedSource`),
the frames ``framepool extract --map-stride`` keeps, so a store re-extracted with the fine-tuned
backbones holds exactly the inputs the head was trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from aggregator.finetune.sources import VideoSource
from aggregator.finetune.surrogate import FinetuneModel, FrameInputs, Frames, n_frames_of
from aggregator.streams import MAP_HEADS

MAP_INPUTS = {"appearance": "appearance_map", "motion": "motion_map"}  # stream -> head input


def map_projection(channels: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The ``[channels, dim]`` float32 projection ``framepool extract --map-dim dim`` uses (Gaussian
    entries of variance ``1/dim`` from NumPy's PCG64 seeded with ``seed``) and its sha256."""
    if channels < 1 or dim < 1:
        raise ValueError(f"channels and dim must be >= 1, got {channels!r}, {dim!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    matrix = rng.standard_normal((channels, dim), dtype=np.float64)
    matrix = (matrix / np.sqrt(dim)).astype(np.float32)
    return torch.from_numpy(matrix), hashlib.sha256(matrix.tobytes()).hexdigest()


class MapBackbone(nn.Module):
    """A torchvision ResNet (``fc`` removed) that returns its last block's output as a map.

    Shapes: ``forward(x [n, c, H, W]) -> [n, h, w, C]`` (``C`` = ``dim`` with a projection). The
    wrapped network is :attr:`net`; its state dict is what ``backbone_<stream>.pt`` holds.
    """

    def __init__(self, net: nn.Module, projection: torch.Tensor | None = None) -> None:
        super().__init__()
        missing = [a for a in ("conv1", "bn1", "relu", "maxpool", "layer4") if not hasattr(net, a)]
        if missing:
            raise ValueError(f"spatial maps need a ResNet backbone; this one lacks {missing}")
        self.net = net
        self.projection: torch.Tensor | None
        self.register_buffer("projection", projection, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n: Any = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))  # [n, C, h, w]
        fmap = x.permute(0, 2, 3, 1)  # [n, h, w, C]
        if self.projection is not None:
            fmap = fmap @ self.projection.to(fmap.dtype)
        return fmap


class StridedFrames:
    """The frames ``0, S, 2S, ...`` of a video's inputs (a :class:`FrameInputs`)."""

    def __init__(self, frames: Frames, stride: int) -> None:
        if stride < 1:
            raise ValueError(f"map stride must be >= 1, got {stride!r}")
        self.inner = frames
        self.stride = stride

    @property
    def n_frames(self) -> int:
        return -(-n_frames_of(self.inner) // self.stride)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        rows = index.to(torch.long) * self.stride
        if isinstance(self.inner, torch.Tensor):
            return self.inner[rows.to(self.inner.device)]
        return self.inner.take(rows)


class StridedSource:
    """A :class:`aggregator.finetune.sources.VideoSource` whose videos are every ``stride``-th
    frame of another's (stored features are vectors, not maps: none are offered)."""

    def __init__(self, source: VideoSource, stride: int) -> None:
        self.source = source
        self.stride = stride

    def frames(self, video_id: str) -> dict[str, Frames]:
        inner = self.source.frames(video_id)
        if self.stride == 1:
            return inner
        out: dict[str, Frames] = {}
        for s, f in inner.items():
            strided: FrameInputs = StridedFrames(f, self.stride)
            out[s] = strided
        return out

    def known(self, video_id: str) -> dict[str, torch.Tensor] | None:
        return None


def map_channels(feature_dims: Mapping[str, int], dim: int | None) -> dict[str, int]:
    """The head's ``in_features``: ``{appearance_map: C, motion_map: C}``."""
    return {MAP_INPUTS[s]: int(dim if dim is not None else d) for s, d in feature_dims.items()}


def build_map_model(
    backbones: Mapping[str, nn.Module],
    head: nn.Module,
    *,
    feature_dims: Mapping[str, int],
    dim: int | None = None,
    seed: int = 0,
) -> FinetuneModel:
    """Backbones wrapped as :class:`MapBackbone` (both streams) + a map head (``stpn``)."""
    if set(backbones) != set(MAP_INPUTS):
        raise ValueError(
            f"a map head fuses the appearance and motion maps; got streams {sorted(backbones)} "
            "(use --streams both)"
        )
    wrapped: dict[str, nn.Module] = {}
    for s, b in backbones.items():
        projection = None if dim is None else map_projection(int(feature_dims[s]), dim, seed)[0]
        wrapped[s] = MapBackbone(b, projection)
    return FinetuneModel(backbones=wrapped, head=head, head_inputs=MAP_INPUTS)


def exported_backbone(module: nn.Module) -> nn.Module:
    """The network whose state dict is saved as ``backbone_<stream>.pt`` (unwrapped)."""
    return module.net if isinstance(module, MapBackbone) else module


__all__ = [
    "MAP_HEADS",
    "MAP_INPUTS",
    "MapBackbone",
    "StridedFrames",
    "StridedSource",
    "build_map_model",
    "exported_backbone",
    "map_channels",
    "map_projection",
]
