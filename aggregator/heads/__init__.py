"""Temporal pooling heads: one ``nn.Module`` per file, and the one name -> class table.

Single-stream heads (:class:`NodeHead`) take ``forward(x [B, T, d], lengths [B]) -> [B, C]`` and
``forward_nodes(nodes [B, M, d])``; a video model over named streams is a :class:`TwoStream` of
them, or a :class:`CompactBilinearHead`, which fuses the streams itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from aggregator.heads.attn import AttentiveProbe
from aggregator.heads.base import NodeHead, NodeInput
from aggregator.heads.datp import AdaptiveTemporalPooling
from aggregator.heads.global_pool import GlobalPool
from aggregator.heads.standardize import InputStandardizer
from aggregator.heads.stcb import CompactBilinear, CompactBilinearHead
from aggregator.heads.stpn import SpatiotemporalPyramid
from aggregator.heads.tp import TemporalPyramid
from aggregator.heads.tpp import TemporalPyramidPooling
from aggregator.heads.two_stream import TwoStream
from aggregator.intervals import Intervals, PyramidLeaves, pyramid_mix

HEADS: dict[str, type[nn.Module]] = {
    "gap": GlobalPool,
    "max": GlobalPool,
    "tp": TemporalPyramid,
    "tpp": TemporalPyramidPooling,
    "datp": AdaptiveTemporalPooling,
    "stcb": CompactBilinearHead,
    "stpn": SpatiotemporalPyramid,
    "attn": AttentiveProbe,
}
# keyword arguments a head name fixes (two names, one class)
HEAD_PRESETS: dict[str, dict[str, Any]] = {"gap": {"kind": "mean"}, "max": {"kind": "max"}}

VideoModel = TwoStream | CompactBilinearHead
MapModel = SpatiotemporalPyramid  # reads map streams [B, T, h, w, C], not frame vectors


def _tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; heads take tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_model(
    head: str,
    *,
    in_features: Mapping[str, int],
    num_classes: int,
    head_kwargs: Mapping[str, Any] | None = None,
    fusion: str = "learned",
    fusion_weights: Mapping[str, float] | None = None,
    standardize: bool = False,
    learned_on: str = "probabilities",
) -> VideoModel:
    """A video model over the streams of ``in_features`` (stream name -> feature size d).

    ``head_kwargs`` are the head class's keyword arguments other than ``in_features`` and
    ``num_classes`` (the same for every stream); :data:`HEAD_PRESETS` adds those a head name
    fixes (``max`` is :class:`GlobalPool` with ``kind="max"``). For every head but ``stcb`` each
    stream gets its own head and the streams are fused late by a :class:`TwoStream` with
    ``fusion`` ("learned" or "fixed") and initial/fixed ``fusion_weights``; ``standardize`` gives
    it an :class:`InputStandardizer` (``stcb`` batch-normalises its inputs itself and takes none);
    ``learned_on="logits"`` rebuilds runs whose learned fusion was on logits (see
    :class:`TwoStream`).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known: {sorted(HEADS)}")
    if not in_features:
        raise ValueError("in_features names no stream")
    kwargs = _tuples(head_kwargs or {})
    for reserved in ("in_features", "num_classes"):
        if reserved in kwargs:
            raise ValueError(f"head_kwargs must not set {reserved!r}")
    for key, value in HEAD_PRESETS.get(head, {}).items():
        if kwargs.setdefault(key, value) != value:
            raise ValueError(
                f"head {head!r} means {key}={value!r}, but head_kwargs set {key}={kwargs[key]!r}"
            )
    if head == "stcb":
        return CompactBilinearHead(in_features=dict(in_features), num_classes=num_classes, **kwargs)
    if head == "stpn":
        return SpatiotemporalPyramid(  # type: ignore[return-value]
            in_features=dict(in_features), num_classes=num_classes, **kwargs
        )
    cls = HEADS[head]
    heads = {}
    for stream, d in in_features.items():
        module = cls(in_features=int(d), num_classes=num_classes, **kwargs)
        assert isinstance(module, NodeHead)
        heads[stream] = module
    if fusion not in ("learned", "fixed"):
        raise ValueError(f"fusion must be 'learned' or 'fixed', got {fusion!r}")
    return TwoStream(
        heads=heads,
        fusion=fusion,  # type: ignore[arg-type]
        weights=fusion_weights,
        standardize=standardize,
        learned_on=learned_on,  # type: ignore[arg-type]
    )


__all__ = [
    "HEADS",
    "HEAD_PRESETS",
    "AdaptiveTemporalPooling",
    "AttentiveProbe",
    "CompactBilinear",
    "CompactBilinearHead",
    "GlobalPool",
    "InputStandardizer",
    "Intervals",
    "MapModel",
    "NodeHead",
    "NodeInput",
    "PyramidLeaves",
    "SpatiotemporalPyramid",
    "TemporalPyramid",
    "TemporalPyramidPooling",
    "TwoStream",
    "VideoModel",
    "build_model",
    "pyramid_mix",
]
