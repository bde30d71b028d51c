"""What every single-stream pooling head shares: the ragged-batch contract, the node fast path."""

from __future__ import annotations

import torch
from torch import nn

from aggregator.intervals import Intervals, PyramidLeaves, batch_pool_intervals

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
    # the selection grid's configurations of this head may be stepped as one batched model
    # (:mod:`aggregator.batched_trials`)
    batch_steps: bool = True

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

    def probe_name(self) -> str | None:
        """The linear probe this head can represent (``"global_mean"``, ``"pyramid_nodes"``,
        ...), or None. A head that names one is a linear classifier ``fc`` on :meth:`features`
        (``classify = fc(dropout(features))``) whose layers before it
        :meth:`represent_probe` can set so that the features carry the probe's inputs."""
        return None

    def represent_probe(self, nodes: torch.Tensor) -> None:
        """Set the layers before the classifier from standardised training summaries
        ``nodes [n, M, d]`` so that :meth:`features` (in eval mode) is an invertible affine
        image of the probe's inputs (beta uniform); only for heads with a :meth:`probe_name`."""
        raise ValueError(f"{type(self).__name__} cannot represent a linear probe")

    @torch.no_grad()
    def set_classifier(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the final linear classifier ``fc`` (``weight [C, feature_dim]``, ``bias [C]``)."""
        fc = getattr(self, "fc", None)
        if not isinstance(fc, nn.Linear) or tuple(fc.weight.shape) != tuple(weight.shape):
            raise ValueError(
                f"{type(self).__name__}: no classifier fc of shape {tuple(weight.shape)}"
            )
        fc.weight.copy_(weight.to(fc.weight.dtype))
        fc.bias.copy_(bias.to(fc.bias.dtype))

    def forward_nodes(self, nodes: NodeInput) -> torch.Tensor:
        return self.classify(self.features(nodes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[2] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects x [B, T, {self.in_features}], got {tuple(x.shape)}"
            )
        return self.forward_nodes(self.pool(x, lengths))


@torch.no_grad()
def set_running_statistics(norm: nn.BatchNorm1d, x: torch.Tensor) -> None:
    """A batch norm's running mean and (population) variance set to those of ``x [n, F]``."""
    mean, var = norm.running_mean, norm.running_var
    assert mean is not None and var is not None
    mean.copy_(x.mean(0))
    var.copy_(x.var(0, unbiased=False))


class Dropout(nn.Module):
    """Inverted dropout with cheap masks (the semantics of ``nn.Dropout``).

    Each 64-bit random word gives four 16-bit lanes; an element is kept when its lane clears a
    threshold, so it is kept with probability ``q = 1 - p`` rounded to a multiple of 2^-16, and
    kept elements are scaled by exactly ``1 / q`` (the expectation is unchanged). On CPU this
    draws a mask about twenty times faster than ``nn.Dropout``'s ``bernoulli_``, which had
    taken a sixth to a quarter of a training step on the wide pooled features of these heads.
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
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), None)  # uniform over all 64-bit patterns
        lanes = words.view(torch.int16)[:n].reshape(x.shape)  # uniform on [-2^15, 2^15)
        drop = round(self.p * 65536)  # lanes dropped out of 65536
        if drop >= 65536:
            return torch.zeros_like(x)
        keep = lanes >= drop - 32768  # kept with probability (65536 - drop) / 65536
        return x * keep.to(x.dtype).mul_(65536.0 / (65536 - drop))

    def extra_repr(self) -> str:
        return f"p={self.p}"
