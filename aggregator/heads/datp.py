"""``datp``: deep adaptive temporal pooling, after the DATP paper.

An auxiliary temporal conv net reads the N segment features of a video and regresses the
parameters of a weight generator: a mixture of K Gaussians (rho, mu, sigma) evaluated at the
segment times ``t_i`` in [0, 1], or N discrete weights. The segment class scores ``I_i`` are
pooled as ``S = sum_i w_i I_i / ||w||_2`` (Eq. 3).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from aggregator.heads.base import Dropout, NodeHead, NodeInput
from aggregator.intervals import Intervals

_MIN_SIGMA = 0.01


def mixture_weights(
    t: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """``w_i = sum_k rho_k N(t_i; mu_k, sigma_k^2)`` (Eq. 1).

    Args:
        t: ``[N]`` segment times in [0, 1].
        rho, mu, sigma: ``[B, K]`` mixture weights, means and standard deviations.

    Returns:
        ``[B, N]`` temporal weights.
    """
    z = (t[None, None, :] - mu[..., None]) / sigma[..., None]  # [B, K, N]
    density = torch.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * sigma[..., None])
    return (rho[..., None] * density).sum(dim=1)  # [B, N]


def relative_mixture_weights(
    t: torch.Tensor, log_rho: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """``[B, N]`` mixture weights (Eq. 1) divided by their largest, computed from logarithms.

    Eq. 3 divides by ``||w||``, so it is the same for ``w`` and ``w / max_i w_i``. Computed
    directly, a mixture whose means drift outside [0, 1] or whose deviations shrink gives
    densities that underflow to zero at every segment: the pooled features, the logits and
    every gradient become 0 and the head stays at chance for good. In logarithms the largest
    weight is 1 and the others keep their ratios to it: the head pools at worst onto the
    nearest segment, and its classifier keeps learning.
    """
    z = (t[None, None, :] - mu[..., None]) / sigma[..., None]  # [B, K, N]
    log_density = -0.5 * z * z - torch.log(math.sqrt(2.0 * math.pi) * sigma[..., None])
    log_w = torch.logsumexp(log_rho[..., None] + log_density, dim=1)  # [B, N]
    return torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)


def weighted_pool(scores: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``S = sum_i w_i I_i / ||w||_2`` (Eq. 3): ``scores [B, N, C]``, ``w [B, N]`` -> ``[B, C]``."""
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-12)  # [B, 1]
    return torch.einsum("bn,bnc->bc", w, scores) / norm


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class AdaptiveTemporalPooling(NodeHead):
    """DATP over ``segments`` equal-interval segment means (same interval rule as pyramid nodes).

    Segment features ``x [B, N, d]`` are batch-normalised; a shared linear classifier gives the
    segment scores ``I [B, N, C]`` (logits, or probabilities with ``scores="softmax"`` as in the
    paper; logits by default because pooled probabilities make weak logits for the loss).
    The auxiliary net (DATP paper, Table 2, conv-feature column) is a width-1 conv to 64 (run as a
    linear map per segment), two temporal convs of width 3 to 32, two FC layers; its last layer
    starts at zero so that training starts from ``rho_k = 1/K``, ``mu_k = k/(K+1)``,
    ``sigma_k = init_sigma`` (or uniform discrete weights). ``rho = softmax``,
    ``sigma = softplus + 0.01``; ``mu`` is unconstrained. With logit scores Eq. 3 is computed as
    the classifier applied to the pooled segment features (equal, N times cheaper).

    Shapes: ``forward(x [B, T, d], lengths [B]) -> [B, C]``; ``forward_nodes(nodes [B, N, d])``;
    ``features(nodes) -> [B, d]`` = ``sum_i w_i x_i / ||w||_2`` (the pooled segment features);
    ``temporal_weights(nodes) -> [B, N]`` at :meth:`segment_times`.
    """

    def __init__(
        self,
        *,
        in_features: int = 2048,
        num_classes: int = 101,
        segments: int = 10,
        gaussians: int = 2,
        weights: Literal["mog", "discrete"] = "mog",
        scores: Literal["logits", "softmax"] = "logits",
        hidden: int = 64,
        init_sigma: float = 0.2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if weights not in ("mog", "discrete"):
            raise ValueError(f"weights must be 'mog' or 'discrete', got {weights!r}")
        if scores not in ("logits", "softmax"):
            raise ValueError(f"scores must be 'logits' or 'softmax', got {scores!r}")
        if segments < 1 or gaussians < 1:
            raise ValueError(f"need segments >= 1 and gaussians >= 1, got {segments}, {gaussians}")
        if init_sigma <= _MIN_SIGMA:
            raise ValueError(f"init_sigma must exceed {_MIN_SIGMA}, got {init_sigma}")
        self.input_spec = Intervals((segments,), "mean")
        self.in_features = in_features
        self.out_features = num_classes
        self.feature_dim = in_features
        self.segments = segments
        self.gaussians = gaussians
        self.weights_model = weights
        self.scores = scores
        self.norm = nn.BatchNorm1d(in_features)
        # the width-1 convolution over time is a linear map of each segment: run it as one matmul
        self.aux_in = nn.Linear(in_features, 64)
        self.aux = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv1d(64, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(32, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(32 * segments, hidden),
            nn.ReLU(inplace=True),
        )
        k = gaussians
        self.regress = nn.Linear(hidden, 3 * k if weights == "mog" else segments)
        with torch.no_grad():
            self.regress.weight.zero_()
            if weights == "mog":
                init_mu = torch.arange(1, k + 1, dtype=torch.float32) / (k + 1)
                init_s = torch.full((k,), _inverse_softplus(init_sigma - _MIN_SIGMA))
                self.regress.bias.copy_(torch.cat([torch.zeros(k), init_mu, init_s]))
            else:
                self.regress.bias.fill_(1.0)
        self.drop = Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)
        # pools with the relative weights (see relative_mixture_weights); a model saved before
        # them has no such entry and pools with Eq. 1's weights, as it was trained
        self.register_buffer("relative_weights", torch.ones((), dtype=torch.bool))
        self._relative = True

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        key = prefix + "relative_weights"
        if key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.bool)
        self._relative = bool(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _normalised(self, nodes: NodeInput) -> torch.Tensor:
        nodes = self.node_tensor(nodes)
        b, n, d = nodes.shape
        return self.norm(nodes.reshape(b * n, d)).view(b, n, d)  # [B, N, d]

    def _theta(self, xn: torch.Tensor) -> torch.Tensor:
        """Regressed parameters ``[B, 3K]`` (or ``[B, N]``) of normalised segments ``xn``."""
        h = self.aux_in(xn).transpose(1, 2)  # [B, 64, N]
        return self.regress(self.aux(h))

    def _weights(self, xn: torch.Tensor) -> torch.Tensor:
        """The weights the pooling uses: the mixture's divided by their largest (the same
        pooling, see :func:`relative_mixture_weights`), or the discrete ones."""
        theta = self._theta(xn)  # [B, 3K] or [B, N]
        if self.weights_model == "discrete":
            return theta
        rho, mu, sigma = self._mixture(theta)
        times = self.segment_times(dtype=theta.dtype, device=theta.device)
        if not self._relative:
            return mixture_weights(times, rho, mu, sigma)  # [B, N]
        log_rho = torch.log_softmax(theta[:, : self.gaussians], dim=1)
        return relative_mixture_weights(times, log_rho, mu, sigma)  # [B, N]

    def segment_times(
        self, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> torch.Tensor:
        """``[N]`` segment times ``t_i = (i - 1/2) / N`` in [0, 1]: the segment centres."""
        n = self.segments
        return (torch.arange(n, dtype=dtype, device=device) + 0.5) / n

    def _mixture(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.gaussians
        rho = torch.softmax(theta[:, :k], dim=1)
        mu = theta[:, k : 2 * k]
        sigma = F.softplus(theta[:, 2 * k :]) + _MIN_SIGMA
        return rho, mu, sigma

    def mixture(self, nodes: NodeInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rho, mu, sigma)``, each ``[B, K]``, regressed for segment features ``nodes``."""
        if self.weights_model != "mog":
            raise ValueError("this DATP head uses discrete weights, not a mixture of Gaussians")
        xn = self._normalised(nodes)
        return self._mixture(self._theta(xn))

    def temporal_weights(self, nodes: NodeInput) -> torch.Tensor:
        """``[B, N]`` weights ``w_i`` of the segments at :meth:`segment_times` (Eq. 1)."""
        xn = self._normalised(nodes)
        if self.weights_model == "discrete":
            return self._weights(xn)
        rho, mu, sigma = self._mixture(self._theta(xn))
        times = self.segment_times(dtype=rho.dtype, device=rho.device)
        return mixture_weights(times, rho, mu, sigma)

    def features(self, nodes: NodeInput) -> torch.Tensor:
        xn = self._normalised(nodes)
        return weighted_pool(xn, self._weights(xn))  # [B, d]

    def forward_nodes(self, nodes: NodeInput) -> torch.Tensor:
        xn = self._normalised(nodes)
        w = self._weights(xn)  # [B, N]
        if self.scores == "softmax":
            segment_scores = torch.softmax(self.fc(self.drop(xn)), dim=-1)  # [B, N, C]
            return weighted_pool(segment_scores, w)  # [B, C]
        # logit scores are linear in the segment features, so Eq. 3 equals classifying the pooled
        # features: S = W (sum_i w_i x_i / ||w||) + b sum_i w_i / ||w||; N times fewer FLOPs, and
        # dropout acts on the pooled representation as in the other heads
        pooled = weighted_pool(xn, w)  # [B, d]
        bias_scale = w.sum(dim=1, keepdim=True) / torch.linalg.vector_norm(
            w, dim=1, keepdim=True
        ).clamp_min(1e-12)  # [B, 1]
        return F.linear(self.drop(pooled), self.fc.weight) + bias_scale * self.fc.bias
