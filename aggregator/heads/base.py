"""What every single-stream pooling head shares: the ragged-batch contract, the node fast path."""

from __future__ import annotations

import torch
from torch import nn

from aggregator.heads.pooling import Intervals, PyramidLeaves, batch_pool_intervals

NodeInput = torch.Tensor | PyramidLeaves


class NodeHead(nn.Module):
    """A head that sees a video only through fixed-size interval summaries (pyramid nodes).

    Subclasses set :attr:`input_spec` (which summaries), :attr:`in_features` (d),
    :attr:`out_features` (number of classes C) and :attr:`feature_dim` (size of :meth:`features`),
    and implement :meth:`features` and :meth:`classify`.

    - ``forward(x [B, T, d], lengths [B]) -> [B, C]``: from padded frames; padding is masked, so
      whatever lies past ``lengths`` never changes the output.
    - ``forward_nodes(nodes [B, M, d]) -> [B, C]``: the same from precomputed summaries (the node
      cache), ``M = input_spec.count``. Pyramid nodes may also come as :class:`PyramidLeaves`.
    - ``features(nodes [B, M, d]) -> [B, feature_dim]``: the video-level pooled representation
      (the input of the final classifier), used as an embedding for similarity search.
    """

    input_spec: Intervals
    in_features: int
    out_features: int
    feature_dim: int

    def pool(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, M, d]`` summaries of padded frames ``x [B, T, d]`` with ``lengths [B]``."""
        return batch_pool_intervals(x, lengths, self.input_spec)

    def node_tensor(self, nodes: NodeInput) -> torch.Tensor:
        """``nodes`` as a checked ``[B, M, d]`` tensor (leaves are mixed back into nodes)."""
        if isinstance(nodes, PyramidLeaves):
            nodes = nodes.nodes()
        self.check_nodes(nodes)
        return nodes

    def check_nodes(self, nodes: torch.Tensor) -> None:
        expected = (self.input_spec.count, self.in_features)
        if nodes.dim() != 3 or tuple(nodes.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects nodes [B, {expected[0]}, {expected[1]}], "
                f"got {tuple(nodes.shape)}"
            )

    def features(self, nodes: NodeInput) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` from :meth:`features`."""
        raise NotImplementedError

    def forward_nodes(self, nodes: NodeInput) -> torch.Tensor:
        return self.classify(self.features(nodes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[2] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects x [B, T, {self.in_features}], got {tuple(x.shape)}"
            )
        return self.forward_nodes(self.pool(x, lengths))


class Dropout(nn.Module):
    """Inverted dropout drawing its mask from ``torch.rand`` (same semantics as ``nn.Dropout``).

    On CPU, ``nn.Dropout`` draws its mask with ``bernoulli_``, about five times slower than
    ``rand``; on the wide pooled features of these heads that was a sixth of a training step.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        scaled_keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p)
        return x * scaled_keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
