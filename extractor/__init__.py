"""Decode videos, build appearance and flow inputs, run the backbones, fill a feature store.

Main entry points (imported lazily, so that light modules such as :mod:`extractor.sharding` do not
pull in torch): :class:`~extractor.features.FeatureExtractor` and
:class:`~extractor.features.ExtractedVideo` for one video in memory (both extractors, frame and
window backbones, are :class:`~extractor.video_extractor.VideoExtractor`),
:class:`~extractor.spec.BackboneSpec` for the backbones, flow and dtype they compute with,
:func:`~extractor.pipeline.run_extract` for batch extraction into a store (on a Ray cluster with
``engine="ray"`` and :class:`~extractor.ray_engine.RayOptions`),
:func:`~extractor.synthetic.make_demo_clips` for the generated demo clips.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BackboneSpec": "extractor.spec",
    "FeatureExtractor": "extractor.features",
    "ExtractedVideo": "extractor.features",
    "VideoError": "extractor.decode",
    "build_backbone": "extractor.backbones",
    "cross_modality_conv1": "extractor.backbones",
    "run_extract": "extractor.pipeline",
    "ExtractionSummary": "extractor.records",
    "RayOptions": "extractor.ray_engine",
    "VideoExtractor": "extractor.video_extractor",
    "make_demo_clips": "extractor.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'extractor' has no attribute {name!r}")
