"""Per-stream, per-feature input standardisation ``(x - mean) / std``, held in the model.

The statistics are buffers of the model, so they travel in ``model.pt`` and every path that runs
the model (evaluation, the service, similarity search) applies exactly the transform it was
trained with. A per-feature affine map commutes with the interval summaries the heads read: the
mean (or max, as ``std > 0``) of standardised frames is the standardised mean (max) of the raw
frames, and pyramid leaves mix into nodes with weights that sum to one. So standardising node
summaries is the same as standardising every frame.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from aggregator.heads.base import NodeInput
from aggregator.intervals import PyramidLeaves

MIN_STD = 1e-6  # a feature with a smaller spread (a constant) is only centred


class InputStandardizer(nn.Module):
    """``{stream: [B, M, d]}`` -> ``(x - mean_s) / std_s`` per feature of each stream.

    Starts as the identity (mean 0, std 1); :meth:`set_statistics` fits it. Buffers are named
    ``mean_<stream>`` and ``std_<stream>``.
    """

    def __init__(self, in_features: Mapping[str, int]) -> None:
        super().__init__()
        if not in_features:
            raise ValueError("InputStandardizer needs at least one stream")
        self.streams = tuple(in_features)
        for s, d in in_features.items():
            self.register_buffer(f"mean_{s}", torch.zeros(int(d)))
            self.register_buffer(f"std_{s}", torch.ones(int(d)))

    def statistics(self, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = getattr(self, f"mean_{stream}"), getattr(self, f"std_{stream}")
        assert isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)
        return mean, std

    @torch.no_grad()
    def set_statistics(self, stream: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set one stream's ``mean [d]`` and ``std [d]`` (stds below ``MIN_STD`` become 1)."""
        old_mean, old_std = self.statistics(stream)
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != old_mean.shape or std.shape != old_std.shape:
            raise ValueError(
                f"stream {stream!r}: statistics must have {old_mean.numel()} features, got "
                f"mean {tuple(mean.shape)} and std {tuple(std.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError(f"stream {stream!r}: statistics are not finite")
        old_mean.copy_(mean)
        old_std.copy_(torch.where(std > MIN_STD, std, torch.ones_like(std)))

    def transform(self, stream: str, x: NodeInput) -> NodeInput:
        """One stream's summaries ``[B, M, d]`` (or pyramid leaves) standardised."""
        mean, std = self.statistics(stream)
        if isinstance(x, PyramidLeaves):
            return PyramidLeaves(self._affine(x.leaves, mean, std), x.mix)
        return self._affine(x, mean, std)

    @staticmethod
    def _affine(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        # float32 at least: features far from zero lose their differences in 16-bit arithmetic
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(dtype) - mean.to(dtype)) / std.to(dtype)

    def forward(self, nodes: Mapping[str, NodeInput]) -> dict[str, NodeInput]:
        return {s: self.transform(s, v) if s in self.streams else v for s, v in nodes.items()}


class RunningMoments:
    """Per-stream feature means and standard deviations accumulated over row batches.

    Sums are float64 around a shift (the first batch's mean), which keeps the sum of squares from
    cancelling when the features sit far from zero. :meth:`add` takes ``[..., d]`` rows (node
    tensors or :class:`~aggregator.intervals.PyramidLeaves`); :meth:`result` gives float32
    ``(mean, std)`` per stream (population std).
    """

    def __init__(self) -> None:
        self._acc: dict[str, list[torch.Tensor | int]] = {}

    def add(self, stream: str, values: torch.Tensor | PyramidLeaves) -> None:
        t = values.leaves if isinstance(values, PyramidLeaves) else values
        x = t.reshape(-1, t.shape[-1]).double().cpu()
        if stream not in self._acc:
            self._acc[stream] = [x.mean(0), torch.zeros_like(x[0]), torch.zeros_like(x[0]), 0]
        acc = self._acc[stream]
        x = x - acc[0]
        acc[1] = acc[1] + x.sum(0)
        acc[2] = acc[2] + (x * x).sum(0)
        acc[3] = int(acc[3]) + x.shape[0]

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for stream, (shift, total, square, count) in self._acc.items():
            assert isinstance(shift, torch.Tensor) and isinstance(total, torch.Tensor)
            assert isinstance(square, torch.Tensor) and isinstance(count, int)
            mean = total / count
            var = (square / count - mean * mean).clamp_min(0.0)
            out[stream] = ((mean + shift).float(), var.sqrt().float())
        return out
