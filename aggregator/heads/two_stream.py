"""Late fusion of per-stream heads: learned weights on probabilities (the multiple aggregation
paper), or fixed weights on scores (DTPP: 0.5/0.5)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from aggregator.heads.base import NodeHead, NodeInput
from aggregator.heads.standardize import InputStandardizer
from aggregator.intervals import Intervals


class TwoStream(nn.Module):
    """Late fusion of per-stream heads over named streams (``appearance``, ``motion``).

    The weights satisfy ``w_s >= 0`` and ``sum_s w_s = 1``.

    - ``fusion="learned"`` (the multiple aggregation paper): ``w = softmax(w_hat)`` (starting
      from ``weights`` or equal weights) mixes the streams' class *probabilities*,
      ``p = sum_s w_s softmax(z_s)``, and the model's output is ``log p`` (so ``softmax`` of it
      is ``p`` and cross-entropy on it is ``-log p_y``). On logits the weights would not be
      identifiable: scaling one stream's classifier compensates any change of ``w``; on
      probabilities they are.
    - ``fusion="fixed"`` (DTPP): ``logits = sum_s w_s z_s`` with the given weights.

    ``learned_on="logits"`` fuses learned weights on logits instead, as runs written before
    probability fusion were trained (they load with it). One stream is allowed (its weight is
    1). With ``standardize``, an
    :class:`InputStandardizer` (identity until fitted) maps every stream's summaries to
    ``(x - mean) / std`` before its head.

    Shapes: ``forward(x {stream: [B, T, d_s]}, lengths [B]) -> [B, C]``;
    ``forward_nodes(nodes {stream: [B, M_s, d_s]}) -> [B, C]``;
    ``features(nodes) -> [B, sum_s feature_dim_s]``: each stream's features L2-normalised and
    scaled by ``sqrt(w_s)``, so an inner product of two embeddings is the fusion-weighted sum of
    per-stream cosine similarities.
    """

    def __init__(
        self,
        *,
        heads: Mapping[str, NodeHead],
        fusion: Literal["learned", "fixed"] = "learned",
        weights: Mapping[str, float] | None = None,
        standardize: bool = False,
        learned_on: Literal["probabilities", "logits"] = "probabilities",
    ) -> None:
        super().__init__()
        if learned_on not in ("probabilities", "logits"):
            raise ValueError(f"learned_on must be 'probabilities' or 'logits', got {learned_on!r}")
        self.learned_on = learned_on
        if not heads:
            raise ValueError("TwoStream needs at least one stream head")
        if fusion not in ("learned", "fixed"):
            raise ValueError(f"fusion must be 'learned' or 'fixed', got {fusion!r}")
        classes = {h.out_features for h in heads.values()}
        if len(classes) != 1:
            raise ValueError(f"stream heads disagree on the number of classes: {classes}")
        self.streams = tuple(heads)
        self.heads = nn.ModuleDict(dict(heads))
        self.fusion = fusion
        self.out_features = classes.pop()
        self.feature_dim = sum(h.feature_dim for h in heads.values())
        if weights is None:
            init = torch.full((len(self.streams),), 1.0 / len(self.streams))
        else:
            if set(weights) != set(self.streams):
                raise ValueError(
                    f"fusion weights {dict(weights)!r} must name streams {self.streams}"
                )
            init = torch.tensor([float(weights[s]) for s in self.streams])
            if (init < 0).any() or init.sum() <= 0 or (fusion == "learned" and (init <= 0).any()):
                raise ValueError(f"fusion weights must be positive, got {dict(weights)!r}")
            init = init / init.sum()
        if fusion == "learned":
            self.fusion_logits = nn.Parameter(torch.log(init))
        else:
            self.register_buffer("fixed_weights", init)
        self.standardizer: InputStandardizer | None = (
            InputStandardizer({s: h.in_features for s, h in heads.items()}) if standardize else None
        )

    @property
    def input_specs(self) -> dict[str, Intervals]:
        """Which interval summaries each stream's head reads."""
        return {s: self.stream_head(s).input_spec for s in self.streams}

    def stream_head(self, stream: str) -> NodeHead:
        head = self.heads[stream]
        assert isinstance(head, NodeHead)
        return head

    def weights_tensor(self) -> torch.Tensor:
        """``[S]`` fusion weights in :attr:`streams` order (differentiable when learned)."""
        if self.fusion == "learned":
            return torch.softmax(self.fusion_logits, dim=0)
        fixed = self.fixed_weights
        assert isinstance(fixed, torch.Tensor)
        return fixed

    def fusion_weights(self) -> dict[str, float]:
        w = self.weights_tensor().detach().cpu().tolist()
        return {s: float(v) for s, v in zip(self.streams, w, strict=True)}

    def _check(self, x: Mapping[str, object]) -> None:
        missing = [s for s in self.streams if s not in x]
        if missing:
            raise KeyError(f"missing streams {missing!r}; this model reads {self.streams}")

    def prepare(self, nodes: Mapping[str, NodeInput]) -> dict[str, NodeInput]:
        """The summaries each stream head sees: standardised when the model standardises."""
        self._check(nodes)
        if self.standardizer is None:
            return {s: nodes[s] for s in self.streams}
        return self.standardizer({s: nodes[s] for s in self.streams})

    def stream_logits(self, nodes: Mapping[str, NodeInput]) -> dict[str, torch.Tensor]:
        """Each stream head's own logits ``[B, C]``."""
        x = self.prepare(nodes)
        return {s: self.stream_head(s).forward_nodes(x[s]) for s in self.streams}

    def fuse(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, C]`` output from each stream's logits: ``log sum_s w_s softmax(z_s)`` (learned
        weights) or ``sum_s w_s z_s`` (fixed weights)."""
        w = self.weights_tensor()
        if self.fusion == "learned" and self.learned_on == "probabilities":
            # log p = logsumexp_s (log w_s + log_softmax(z_s)): stable, and -inf only where w_s = 0
            parts = [
                torch.log(w[i]).to(logits[s].dtype) + F.log_softmax(logits[s], dim=1)
                for i, s in enumerate(self.streams)
            ]
            return torch.logsumexp(torch.stack(parts), dim=0)  # [B, C]
        out = w[0] * logits[self.streams[0]]
        for i, s in enumerate(self.streams[1:], start=1):
            out = out + w[i] * logits[s]
        return out  # [B, C]

    def forward_nodes(self, nodes: Mapping[str, NodeInput]) -> torch.Tensor:
        return self.fuse(self.stream_logits(nodes))

    def features(self, nodes: Mapping[str, NodeInput]) -> torch.Tensor:
        nodes = self.prepare(nodes)
        w = self.weights_tensor().detach()
        parts = [
            F.normalize(self.stream_head(s).features(nodes[s]), dim=1) * math.sqrt(float(w[i]))
            for i, s in enumerate(self.streams)
        ]
        return torch.cat(parts, dim=1)  # [B, sum feature_dim]

    def forward(self, x: Mapping[str, torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        self._check(x)
        nodes = {s: self.stream_head(s).pool(x[s], lengths) for s in self.streams}
        return self.forward_nodes(nodes)
