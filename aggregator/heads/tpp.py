"""``tpp``: temporal pyramid pooling of DTPP (section 3.1)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from aggregator.heads.base import Dropout, NodeHead, NodeInput
from aggregator.intervals import Intervals


class TemporalPyramidPooling(NodeHead):
    """Pool the frames in ``levels`` partitions (bins per level, ``(1, 2, 4)`` by default) by max
    or average, concatenate the ``M = sum(levels)`` bins, dropout (0.8 in DTPP), FC.

    Shapes: ``forward(x [B, T, d], lengths [B]) -> [B, C]``; ``forward_nodes(nodes [B, M, d])``
    (node maxes for ``pooling="max"``, node means for ``"average"``);
    ``features(nodes) -> [B, M * d]``.
    """

    def __init__(
        self,
        *,
        in_features: int = 2048,
        num_classes: int = 101,
        levels: tuple[int, ...] = (1, 2, 4),
        pooling: Literal["max", "average"] = "max",
        dropout: float = 0.8,
    ) -> None:
        super().__init__()
        if pooling not in ("max", "average"):
            raise ValueError(f"pooling must be 'max' or 'average', got {pooling!r}")
        self.input_spec = Intervals(tuple(levels), "max" if pooling == "max" else "mean")
        self.in_features = in_features
        self.out_features = num_classes
        self.levels = tuple(levels)
        self.pooling = pooling
        self.feature_dim = self.input_spec.count * in_features
        self.drop = Dropout(dropout)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, nodes: NodeInput) -> torch.Tensor:
        nodes = self.node_tensor(nodes)
        return nodes.reshape(nodes.shape[0], self.feature_dim)  # [B, M * d]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))  # [B, C]

    def probe_name(self) -> str | None:
        """DTPP's head is a linear classifier on its concatenated bins: the probe on those bins
        (node means of the levels for ``average``, node maxima for ``max``)."""
        return "pyramid_nodes" if self.pooling == "average" else "pyramid_maxes"

    def represent_probe(self, nodes: torch.Tensor) -> None:
        self.node_tensor(nodes)  # nothing before the classifier to set
