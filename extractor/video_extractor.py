"""What the service asks of an extractor: one video file in, its features in memory out.

Two kinds of extractor satisfy :class:`VideoExtractor`: :class:`extractor.features.FeatureExtractor`
(per-frame backbones, one row per kept frame) and :class:`extractor.windows.WindowExtractor`
(video transformers, one row per window). A served run holds whichever its store recorded and calls
it through this protocol only; what one kind adds (the frame batcher's ``embed`` of
``FeatureExtractor.extract_file``, a window's span) is asked of that kind by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from extractor.features import ExtractedVideo


@runtime_checkable
class VideoExtractor(Protocol):
    """One video file to features in memory (:meth:`extract_file`), and the configuration a store
    records for them (:meth:`config`)."""

    @property
    def streams(self) -> tuple[str, ...]:
        """The pooled streams it computes (``appearance``, ``motion``)."""
        ...

    @property
    def map_streams(self) -> tuple[str, ...]:
        """The spatial map streams it computes besides (none for window backbones)."""
        ...

    def config(self) -> dict[str, dict[str, Any]]:
        """Per stream, what a store records about how the features were computed."""
        ...

    def extract_file(
        self,
        path: str | Path,
        *,
        stride: int = 1,
        max_frames: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        maps: bool = False,
        max_decoded_frames: int | None = None,
        max_frame_pixels: int | None = None,
    ) -> ExtractedVideo:
        """Decode and embed one video: ``stride`` / ``max_frames`` subsample its frames (where
        rows are frames), ``should_stop`` is polled to abandon it (InterruptedError), ``maps``
        adds the map streams, ``max_decoded_frames`` / ``max_frame_pixels`` bound untrusted input
        (:class:`extractor.decode.VideoTooLarge`)."""
        ...
