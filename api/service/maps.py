"""Spatial maps for a served ``stpn`` run: the recorded map configuration, rebuilt and checked.

An upload's maps come from ``FeatureExtractor.extract_file(..., maps=True)``, in the same forward
passes as its feature vectors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extractor.features import FeatureExtractor
from extractor.spec import MAP_STREAMS
from extractor.video_extractor import VideoExtractor
from extractor.windows import WindowExtractor, is_window_arch


def map_configs(config: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The map streams' entries of a recorded extractor configuration."""
    return {s: c for s, c in config.items() if s in MAP_STREAMS}


def extractor_from_config(
    config: Mapping[str, Mapping[str, Any]], *, device: str = "cpu"
) -> VideoExtractor:
    """:meth:`FeatureExtractor.from_config` plus the recorded map streams, checked to be identical
    (same source backbone, projection, stride); a window backbone's own extractor."""
    if is_window_arch(str(config.get("appearance", {}).get("arch", ""))):
        return WindowExtractor.from_config(config, device=device)
    extractor = FeatureExtractor.from_config(config, device=device)
    maps = map_configs(config)
    if not maps:
        return extractor
    options = {
        (
            int(c["frame_stride"]),
            (c.get("projection") or {}).get("out_channels"),
            int((c.get("projection") or {}).get("seed", 0)),
        )
        for c in maps.values()
    }
    if len(options) != 1:
        raise ValueError(f"recorded map streams differ in stride or projection: {dict(maps)}")
    stride, dim, seed = options.pop()
    extractor.set_maps(
        tuple(s for s in MAP_STREAMS if s in maps), dim=dim, stride=stride, seed=seed
    )
    rebuilt = extractor.config()
    for name, recorded in maps.items():
        keys = set(recorded) | set(rebuilt[name])
        diff = sorted(k for k in keys if recorded.get(k) != rebuilt[name].get(k))
        if diff:
            raise ValueError(f"the {name} stream rebuilt from its record differs in {diff}")
    return extractor
