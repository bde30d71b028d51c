"""``gap`` and ``max``: global pooling over all frames, then batch norm and a linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from aggregator.heads.base import Dropout, NodeHead, NodeInput, set_running_statistics
from aggregator.intervals import Intervals, PoolKind


class GlobalPool(NodeHead):
    """Mean (``kind="mean"``, the ``gap`` head) or per-dimension maximum (``kind="max"``, the
    ``max`` head) of the frame features, i.e. the level-1 pyramid node -> BN -> dropout -> linear.

    Shapes: ``forward(x [B, T, d], lengths [B]) -> [B, C]``; ``forward_nodes(nodes [B, 1, d])``;
    ``features(nodes) -> [B, d]``.
    """

    def __init__(
        self,
        *,
        in_features: int = 2048,
        num_classes: int = 101,
        kind: PoolKind = "mean",
        dropout: float = 0.5,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.input_spec = Intervals((1,), kind)  # validates kind
        self.kind = kind
        self.in_features = in_features
        self.out_features = num_classes
        self.feature_dim = in_features
        self.norm = nn.BatchNorm1d(in_features) if batch_norm else nn.Identity()
        self.drop = Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def features(self, nodes: NodeInput) -> torch.Tensor:
        nodes = self.node_tensor(nodes)
        return self.norm(nodes[:, 0])  # [B, d]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))  # [B, C]

    def probe_name(self) -> str | None:
        """``gap`` is a linear classifier on the global mean: the global-mean probe's model."""
        return "global_mean" if self.kind == "mean" else None

    @torch.no_grad()
    def represent_probe(self, nodes: torch.Tensor) -> None:
        if self.probe_name() is None:
            super().represent_probe(nodes)
        if isinstance(self.norm, nn.BatchNorm1d):  # its running statistics: those of the videos
            set_running_statistics(self.norm, self.node_tensor(nodes)[:, 0].float())

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
