"""``attn``: the attentive probe of frozen-feature benchmarks (V-JEPA 2).

A few learned queries cross-attend, with several heads, over a video's temporal tokens, and a
linear classifier reads the attended queries. The tokens are the video's ``N`` equal-interval
segment means (the interval rule of the pyramid nodes, so they come from the node cache and the
head trains as fast as the others); a video of ``T >= N`` frames has ``N`` distinct tokens, one
per ``T / N`` frames, and ``segments >= T`` gives each frame its own token (a frame that falls
into several segments of a shorter video is weighted by how many it falls into). A learned
position embedding per segment lets the attention tell the start of a video from its end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aggregator.heads.base import Dropout, NodeHead, NodeInput
from aggregator.intervals import Intervals


def cross_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of ``queries [B, Q, e]`` over ``keys, values
    [B, N, e]`` -> ``[B, Q, e]``; ``mask [B, N]`` (True: a token to attend to) hides padding.

    Head ``h`` uses the ``e / heads`` channels ``h * e / heads ...``; every row of ``mask``
    must keep at least one token.
    """
    b, q, e = queries.shape
    n = keys.shape[1]
    if e % heads:
        raise ValueError(f"attention width {e} is not divisible by {heads} heads")
    dh = e // heads
    qh = queries.view(b, q, heads, dh).transpose(1, 2)  # [B, H, Q, dh]
    kh = keys.view(b, n, heads, dh).transpose(1, 2)  # [B, H, N, dh]
    vh = values.view(b, n, heads, dh).transpose(1, 2)  # [B, H, N, dh]
    bias = None
    if mask is not None:
        if mask.shape != (b, n):
            raise ValueError(f"mask must be [{b}, {n}], got {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every video needs at least one unmasked token")
        bias = torch.zeros(b, 1, 1, n, dtype=queries.dtype, device=queries.device)
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))  # [B, 1, 1, N]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)  # [B, H, Q, dh]
    return out.transpose(1, 2).reshape(b, q, e)  # [B, Q, e]


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

    def _qkv(self, nodes: NodeInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.norm_in(self.node_tensor(nodes))  # [B, N, d]
        keys = self.k_proj(x)  # [B, N, e]
        if self.position is not None:
            keys = keys + self.position
        q = self.q_proj(self.queries).expand(x.shape[0], -1, -1)  # [B, Q, e]
        return q, keys, self.v_proj(x)

    def attention(self, nodes: NodeInput) -> torch.Tensor:
        """``[B, H, Q, N]`` attention weights of every head and query over the segments."""
        q, k, _ = self._qkv(nodes)
        b, n, h = k.shape[0], k.shape[1], self.heads
        qh = q.view(b, -1, h, self.dim // h).transpose(1, 2)  # [B, H, Q, dh]
        kh = k.view(b, n, h, self.dim // h).transpose(1, 2)  # [B, H, N, dh]
        return torch.softmax(qh @ kh.transpose(2, 3) / math.sqrt(self.dim // h), dim=-1)

    def features(self, nodes: NodeInput) -> torch.Tensor:
        q, k, v = self._qkv(nodes)
        z = self.out_proj(cross_attention(q, k, v, self.heads))  # [B, Q, e]
        z = z + self.mlp(self.norm_mlp(z))
        return self.norm_out(z).flatten(1)  # [B, Q * e]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))  # [B, C]

    def extra_repr(self) -> str:
        return (
            f"segments={self.segments}, queries={self.n_queries}, dim={self.dim}, "
            f"heads={self.heads}, positional={self.position is not None}"
        )
