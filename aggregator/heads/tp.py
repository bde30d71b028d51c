"""``tp``: the deep temporal pyramid with learned node weights beta (the multiple aggregation
paper, section 3.2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from aggregator.heads.base import Dropout, NodeHead, set_running_statistics
from aggregator.intervals import Intervals, PyramidLeaves, n_nodes
from aggregator.metrics import beta_by_level

PCA_ROWS = 20_000  # node rows whose principal directions a probe start projects on


class TemporalPyramid(NodeHead):
    """Temporal pyramid of ``depth`` levels whose ``M = 2^D - 1`` node means are mixed by beta.

    Node weights live on the simplex through ``beta_p = softmax(beta_hat_p)`` (h = exp), one row
    per pyramid ``p = 1..P``; ``beta_hat = 0`` at initialisation (uniform weights).

    - ``concat`` (map (*) of Eq. 1): each node mean ``psi_n [d]`` is projected to ``node_dim``
      (one shared linear map per pyramid) and batch-normalised per node, then scaled by
      ``beta_{p,n}``; the scaled nodes are concatenated, ``r_p [M * node_dim]``. The batch norm
      sits before the beta scaling because a batch norm right after it would divide each node's
      scale out again and leave the output independent of beta.
    - ``average`` (map (**) of Eq. 1): ``r_p = BN(sum_n beta_{p,n} psi_n) [d]``.
    - ``P = 1``: ``logits = FC(dropout(r_1))``. ``P > 1`` (Table 5): the pyramids' ``r_p`` are
      concatenated and reduced by FC + ReLU + BN to ``hidden`` before dropout and the final FC.

    Shapes: ``forward(x [B, T, d], lengths [B]) -> [B, C]``; ``forward_nodes(nodes [B, M, d])``,
    or nodes as :class:`PyramidLeaves` (``leaves [B, L, d]``, ``mix [B, M, L]``: the linear maps are
    applied to the ``L = 2^(D-1)`` leaves and mixed after, same result at half the cost);
    ``features(nodes) -> [B, feature_dim]`` with ``feature_dim`` = ``M * node_dim`` (concat),
    ``d`` (average) for one pyramid, ``hidden`` for several.
    """

    def __init__(
        self,
        *,
        in_features: int = 2048,
        num_classes: int = 101,
        depth: int = 6,
        variant: Literal["concat", "average"] = "concat",
        node_dim: int = 128,
        pyramids: int = 1,
        hidden: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if variant not in ("concat", "average"):
            raise ValueError(f"variant must be 'concat' or 'average', got {variant!r}")
        if pyramids < 1:
            raise ValueError(f"pyramids must be >= 1, got {pyramids}")
        m = n_nodes(depth)
        self.input_spec = Intervals.pyramid(depth)
        self.in_features = in_features
        self.out_features = num_classes
        self.depth = depth
        self.variant = variant
        self.node_dim = node_dim
        self.pyramids = pyramids
        self.beta_hat = nn.Parameter(torch.zeros(pyramids, m))
        if variant == "concat":
            # all pyramids' projections in one matmul: [d] -> [P * node_dim]
            self.proj = nn.Linear(in_features, pyramids * node_dim)
            self.norm = nn.BatchNorm1d(pyramids * m * node_dim)
            rep_dim = pyramids * m * node_dim
        else:
            self.norm = nn.BatchNorm1d(pyramids * in_features)
            rep_dim = pyramids * in_features
        self.reduce: nn.Module
        if pyramids > 1:
            self.reduce = nn.Sequential(
                nn.Linear(rep_dim, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden)
            )
            self.feature_dim = hidden
        else:
            self.reduce = nn.Identity()
            self.feature_dim = rep_dim
        self.drop = Dropout(dropout)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def node_weights(self) -> torch.Tensor:
        """``[P, M]`` beta (differentiable): every row is on the simplex."""
        return torch.softmax(self.beta_hat, dim=1)

    def beta_matrix(self) -> torch.Tensor:
        """``[P, M]`` beta, detached, on the CPU."""
        return self.node_weights().detach().cpu()

    def beta(self, pyramid: int | None = None) -> list[list[float]]:
        """Node weights level by level: ``[[b_1], [b_2, b_3], ...]``.

        With several pyramids, ``pyramid`` picks one; None gives their mean (still on the simplex).
        """
        b = self.beta_matrix()
        row = b.mean(dim=0) if pyramid is None else b[pyramid]
        return beta_by_level(row.double().numpy())

    def check_leaves(self, nodes: PyramidLeaves) -> None:
        n_leaves, m = 1 << (self.depth - 1), self.input_spec.count
        leaves, mix = nodes.leaves, nodes.mix
        if (
            leaves.dim() != 3
            or tuple(leaves.shape[1:]) != (n_leaves, self.in_features)
            or tuple(mix.shape) != (leaves.shape[0], m, n_leaves)
        ):
            raise ValueError(
                f"TemporalPyramid expects leaves [B, {n_leaves}, {self.in_features}] and mix "
                f"[B, {m}, {n_leaves}], got {tuple(leaves.shape)} and {tuple(mix.shape)}"
            )

    def pyramid_representations(self, nodes: torch.Tensor | PyramidLeaves) -> torch.Tensor:
        """``[B, P * rep]`` concatenated pyramid representations ``r_p`` (before the reduction)."""
        p = self.pyramids
        beta = self.node_weights()  # [P, M]
        if isinstance(nodes, PyramidLeaves):
            self.check_leaves(nodes)
            b = nodes.leaves.shape[0]
            if self.variant == "concat":
                # proj is affine and the rows of mix sum to 1: mix @ proj(leaves) = proj(nodes)
                leaf_z = self.proj(nodes.leaves)  # [B, L, P * node_dim]
                z = torch.bmm(nodes.mix.to(leaf_z.dtype), leaf_z)  # [B, M, P * node_dim]
                return self._concat(z, beta)
            gamma = torch.einsum("pm,bml->bpl", beta, nodes.mix.to(beta.dtype))  # [B, P, L]
            pooled = torch.einsum("bpl,bld->bpd", gamma.to(nodes.leaves.dtype), nodes.leaves)
            return self.norm(pooled.reshape(b, p * self.in_features))  # [B, P * d]
        self.check_nodes(nodes)
        b = nodes.shape[0]
        if self.variant == "concat":
            return self._concat(self.proj(nodes), beta)  # proj: [B, M, P * node_dim]
        pooled = torch.einsum("pm,bmd->bpd", beta.to(nodes.dtype), nodes)  # [B, P, d]
        return self.norm(pooled.reshape(b, p * self.in_features))  # [B, P * d]

    def _concat(self, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Batch-normalised node projections ``z [B, M, P * node_dim]`` scaled by beta, flat."""
        b, m, _ = z.shape
        p = self.pyramids
        if p > 1:
            z = z.view(b, m, p, self.node_dim).transpose(1, 2)  # [B, P, M, node_dim]
        z = self.norm(z.reshape(b, p * m * self.node_dim))  # [B, P * M * node_dim]
        z = z.view(b, p, m, self.node_dim) * beta[None, :, :, None]  # [B, P, M, node_dim]
        return z.reshape(b, p * m * self.node_dim)

    def features(self, nodes: torch.Tensor | PyramidLeaves) -> torch.Tensor:
        return self.reduce(self.pyramid_representations(nodes))  # [B, feature_dim]

    def forward_nodes(self, nodes: torch.Tensor | PyramidLeaves) -> torch.Tensor:
        return self.classify(self.features(nodes))  # [B, C]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))  # [B, C]

    def probe_name(self) -> str | None:
        """One ``concat`` pyramid is the node-mean probe's model when its projection keeps the
        node means (identity for ``d <= node_dim``, else their ``node_dim`` principal
        directions), its batch norm standardises every node feature and beta is uniform."""
        return "pyramid_nodes" if self.variant == "concat" and self.pyramids == 1 else None

    @torch.no_grad()
    def represent_probe(self, nodes: torch.Tensor) -> None:
        if self.probe_name() is None:
            super().represent_probe(nodes)
        nodes = self.node_tensor(nodes).float()  # [n, M, d]
        n, m, d = nodes.shape
        weight = torch.zeros(self.node_dim, d)
        if d <= self.node_dim:
            weight[:d] = torch.eye(d)
        else:  # the principal directions of the node means (a seeded sample of rows)
            flat = nodes.reshape(n * m, d)
            gen = torch.Generator().manual_seed(0)
            rows = torch.randperm(len(flat), generator=gen)[:PCA_ROWS]
            sample = flat[rows] - flat[rows].mean(0)
            top = torch.linalg.svd(sample, full_matrices=False).Vh[: self.node_dim]
            weight[: len(top)] = top  # fewer node rows than node_dim: the rest stays zero
        self.beta_hat.zero_()
        self.proj.weight.copy_(weight.to(self.proj.weight.dtype))
        self.proj.bias.zero_()
        z = self.proj(nodes.to(self.proj.weight.dtype)).reshape(n, m * self.node_dim)
        set_running_statistics(self.norm, z)
        self.norm.weight.fill_(1.0)
        self.norm.bias.zero_()
