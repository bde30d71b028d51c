"""The stream names the heads read, in one place.

``STREAMS`` are the pooled vector streams, ``MAP_STREAMS`` the spatial map streams (each
computed by the backbone of its source stream, :data:`MAP_SOURCES`), and ``MAP_HEADS`` the
heads that read the map streams instead of the vector ones. The names come from
:mod:`extractor.spec`, which computes the streams.
"""

from __future__ import annotations

from extractor.spec import MAP_SOURCES, MAP_STREAMS, STREAMS

MAP_HEADS = ("stpn",)

__all__ = ["MAP_HEADS", "MAP_SOURCES", "MAP_STREAMS", "STREAMS"]
