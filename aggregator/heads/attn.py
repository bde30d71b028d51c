"""``attn``: the attentive probe of frozen-feature benchmarks (V-JEPA 2).

A few learned queries cross-attend, with several heads, over a video's temporal tokens, and a
linear classifier reads the attended queries. The tokens are the video's ``N`` equal-interval
segment means (the interval rule of the pyramid nodes, so they come from the node cache and the
head trains as fast as the others); a video of ``T >= N`` frames has ``N`` distinct tokens, one
per ``T / N`` frames, and ``segments = T`` gives each frame its own token (a frame that falls
into several segments of a shorter video is weighted by how many it falls into). A learned
position embedding per segment lets the attention tell the start of a video from its end.

The attention runs in the input space: the queries are mapped through the key projection once
per batch, and the attended tokens (not every token) through the value projection, which is
exact (the softmax weights sum to one) and costs ``2 H Q N d + Q d e`` multiply-adds per video
instead of the ``2 N d e`` of projecting every token: about a fifth at the defaults (``H = 8``
heads, ``Q = 4`` queries, ``N = 32`` tokens, ``e = 256``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aggregator.heads.base import Dropout, NodeHead, NodeInput
from aggregator.intervals import Intervals


class AttentiveProbe(NodeHead):
    """Learned queries -> multi-head cross-attention over the segment tokens -> linear classifier.

    Tokens ``x [B, N, d]`` are layer-normalised; keys are ``W_k x + p`` (``p [N, e]`` a learned
    position embedding, zero at the start), values ``W_v x``; ``queries`` learned vectors
    ``[Q, e]`` attend over them with ``heads`` heads; the ``Q`` outputs go through the output
    projection, a residual MLP (as in V-JEPA 2's attentive pooler), are layer-normalised and
    concatenated into the video feature ``[B, Q e]``; dropout and a linear map give the logits.

    Shapes: ``forward(x [B, T, d], lengths [B]) -> [B, C]`` (padding past ``lengths`` never reaches
    the attention); ``forward_nodes(nodes [B, N, d])``; ``features(nodes) -> [B, Q * dim]``;
    ``attention(nodes) -> [B, H, Q, N]`` (the weights of every head and query on every segment).
    """

    # its einsums, vectorised over the grid, ran 2-3x slower than the grid one configuration
    # after the other (6-d segments, 8 videos a batch)
    batch_steps = False

    def __init__(
        self,
        *,
        in_features: int = 2048,
        num_classes: int = 101,
        segments: int = 32,
        queries: int = 4,
        dim: int = 256,
        heads: int = 8,
        mlp_ratio: float = 2.0,
        positional: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if segments < 1 or queries < 1 or heads < 1:
            raise ValueError(
                f"need segments, queries and heads >= 1, got {segments}, {queries}, {heads}"
            )
        if dim < 1 or dim % heads:
            raise ValueError(f"dim must be a positive multiple of heads={heads}, got {dim}")
        self.input_spec = Intervals((segments,), "mean")
        self.in_features = in_features
        self.out_features = num_classes
        self.feature_dim = queries * dim
        self.segments = segments
        self.n_queries = queries
        self.dim = dim
        self.heads = heads
        self.norm_in = nn.LayerNorm(in_features)
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(in_features, dim)
        self.v_proj = nn.Linear(in_features, dim)
        self.position = nn.Parameter(torch.zeros(segments, dim)) if positional else None
        self.out_proj = nn.Linear(dim, dim)
        hidden = max(1, round(mlp_ratio * dim))
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.drop = Dropout(dropout)
        self.fc = nn.Linear(queries * dim, num_classes)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, Q, N]`` attention logits of normalised tokens ``x [B, N, d]``.

        ``q_h . (W_k x + b_k + p)_h = (W_kh^T q_h) . x + q_h . p_h + q_h . b_kh``: the queries are
        taken to the input space once per batch (``[Q, H, d]``) instead of projecting every token
        to keys, and the key bias term, the same for every token, cancels in the softmax.
        """
        h, dh = self.heads, self.dim // self.heads
        q = self.q_proj(self.queries).view(-1, h, dh)  # [Q, H, dh]
        wk = self.k_proj.weight.view(h, dh, -1)  # [H, dh, d]
        u = torch.einsum("qhc,hcd->hqd", q, wk)  # [H, Q, d]
        scores = torch.einsum("bnd,hqd->bhqn", x, u)  # [B, H, Q, N]
        if self.position is not None:
            p = self.position.view(-1, h, dh)  # [N, H, dh]
            scores = scores + torch.einsum("qhc,nhc->hqn", q, p)  # [H, Q, N], broadcast over B
        return scores / math.sqrt(dh)

    def attention(self, nodes: NodeInput) -> torch.Tensor:
        """``[B, H, Q, N]`` attention weights of every head and query over the segments."""
        x = self.norm_in(self.node_tensor(nodes))  # [B, N, d]
        return torch.softmax(self._scores(x), dim=-1)

    def features(self, nodes: NodeInput) -> torch.Tensor:
        x = self.norm_in(self.node_tensor(nodes))  # [B, N, d]
        a = torch.softmax(self._scores(x), dim=-1)  # [B, H, Q, N]
        # the weights sum to 1, so attending to the values is projecting the attended tokens:
        # sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + b_v, Q H vectors per video, not N
        pooled = torch.einsum("bhqn,bnd->bhqd", a, x)  # [B, H, Q, d]
        h, dh = self.heads, self.dim // self.heads
        wv = self.v_proj.weight.view(h, dh, -1)  # [H, dh, d]
        z = torch.einsum("bhqd,hcd->bqhc", pooled, wv).reshape(x.shape[0], -1, self.dim)
        z = self.out_proj(z + self.v_proj.bias)  # [B, Q, e]
        z = z + self.mlp(self.norm_mlp(z))
        return self.norm_out(z).flatten(1)  # [B, Q * e]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))  # [B, C]

    def extra_repr(self) -> str:
        return (
            f"segments={self.segments}, queries={self.n_queries}, dim={self.dim}, "
            f"heads={self.heads}, positional={self.position is not None}"
        )
