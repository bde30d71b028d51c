"""What every trained run offers to evaluation and to the service, whatever its head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """A trained run loaded for inference on the features of one video at a time.

    ``features`` maps a stream name (``"appearance"``, ``"motion"``) to that video's ``[T, d]``
    frame features, extracted with :attr:`extractor` (the store's extractor config per stream).
    """

    run_id: str
    head: str
    class_names: list[str]
    streams: list[str]
    extractor: dict[str, Any]

    def predict_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[C]`` class probabilities (sum to 1)."""
        ...

    def embed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[e]`` float32 video-level embedding (the head's pooled representation) for search."""
        ...

    def beta(self) -> dict[str, list[list[float]]] | None:
        """Learned node weights per stream, level by level, or None when the head has none."""
        ...
