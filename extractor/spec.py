"""``BackboneSpec``: which backbones and flow backend compute the features.

The one description of a feature configuration that ``framepool extract``, ``framepool finetune``,
:class:`extractor.features.FeatureExtractor`, :func:`extractor.pipeline.run_extract` and the
fine-tuning job share. It imports nothing heavy, so the command line can build one before torch
is loaded. Where the computation runs (device, batch size, decode threads) is not part of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STREAMS = ("appearance", "motion")  # the two streams, in their canonical order
# the spatial map streams, each computed by the backbone of the stream it is named after
MAP_SOURCES = {"appearance_map": "appearance", "motion_map": "motion"}
MAP_STREAMS = tuple(MAP_SOURCES)


@dataclass(frozen=True)
class BackboneSpec:
    """Per stream the backbone and its weights, the flow backend, and the compute dtype.

    ``weights`` is ``"imagenet"`` (torchvision's cache, downloaded there when missing; timm's
    pretrained weights for ``timm:<name>``), ``"random"`` (seeded with ``seed``) or a state-dict
    path; ``motion_weights`` defaults to ``weights`` (a 3-channel conv1 gets the cross-modality
    initialisation). ``arch`` is a ResNet or ``timm:<name>`` (appearance only, with its own
    preprocessing); ``motion_arch`` (default: ``arch``) is the motion stream's ResNet, required
    when ``arch`` is a timm model. ``flow`` names the flow backend, ``flow_weights`` is the RAFT
    weights file and ``flow_params`` the backend's options (e.g. ``{"dtype": "bfloat16"}`` for
    RAFT). ``dtype``: ``auto`` computes in bfloat16 where the device supports it natively, else
    float32.
    """

    streams: tuple[str, ...] = STREAMS
    arch: str = "resnet101"
    motion_arch: str | None = None
    weights: str | Path = "imagenet"
    motion_weights: str | Path | None = None
    flow: str = "dis"
    flow_weights: str | Path | None = None
    flow_params: Mapping[str, Any] | None = field(default=None, hash=False)
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "streams", tuple(self.streams))
