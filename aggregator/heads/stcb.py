"""``stcb``: spatiotemporal compact bilinear fusion (STPN, Algorithm 1).

The Count Sketch of a vector ``v [p]`` with fixed random ``h [p]`` (indices in 0..d-1) and
``s [p]`` (signs) is ``v'[k] = sum_{j: h(j) = k} s(j) v(j)``. The sketch of the outer product of
several vectors is the circular convolution of their sketches, computed as
``irfft(prod_i rfft(v_i'))``: ``<phi(x, y), phi(x', y')>`` is an unbiased estimate of
``<x, x'><y, y'>`` without ever forming ``x y^T``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from aggregator.heads.base import Dropout, NodeInput
from aggregator.intervals import Intervals, PyramidLeaves, batch_pool_intervals


class CompactBilinear(nn.Module):
    """Compact bilinear fusion of ``len(in_features)`` vectors into ``out_features`` dimensions.

    ``h`` and ``s`` of each input are drawn once from ``seed`` and kept as (saved) buffers.

    Shapes: ``forward(v_1 [B, p_1], ..., v_m [B, p_m]) -> [B, out_features]``.
    """

    def __init__(
        self,
        *,
        in_features: tuple[int, ...] = (2048, 2048),
        out_features: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not in_features or any(p < 1 for p in in_features):
            raise ValueError(f"in_features must be positive sizes, got {in_features!r}")
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {out_features}")
        self.in_features = tuple(in_features)
        self.out_features = out_features
        gen = torch.Generator().manual_seed(seed)
        for i, p in enumerate(self.in_features):
            self.register_buffer(f"h{i}", torch.randint(out_features, (p,), generator=gen))
            signs = torch.randint(2, (p,), generator=gen).to(torch.float32) * 2 - 1
            self.register_buffer(f"s{i}", signs)

    def sketch(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """Count Sketch ``[B, out_features]`` of input ``i``'s vectors ``v [B, p_i]``."""
        h: torch.Tensor = getattr(self, f"h{i}")
        s: torch.Tensor = getattr(self, f"s{i}")
        out = v.new_zeros(v.shape[0], self.out_features)
        return out.index_add(1, h, v * s.to(v.dtype))

    def forward(self, *vectors: torch.Tensor) -> torch.Tensor:
        if len(vectors) != len(self.in_features):
            raise ValueError(f"expected {len(self.in_features)} vectors, got {len(vectors)}")
        spectrum: torch.Tensor | None = None
        for i, v in enumerate(vectors):
            if v.dim() != 2 or v.shape[1] != self.in_features[i]:
                raise ValueError(
                    f"input {i} must be [B, {self.in_features[i]}], got {tuple(v.shape)}"
                )
            f = torch.fft.rfft(self.sketch(i, v), n=self.out_features)  # [B, d/2 + 1] complex
            spectrum = f if spectrum is None else spectrum * f
        assert spectrum is not None
        return torch.fft.irfft(spectrum, n=self.out_features)  # [B, d]


def signed_sqrt_l2(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Signed square root then L2 normalisation per row (the usual bilinear-feature scaling).

    ``z / sqrt(|z| + eps)`` is ``sign(z) sqrt(|z|)`` away from 0 and, unlike it, continuous with a
    finite gradient at 0, so that round-off around 0 (FFT output) does not flip values.
    """
    z = z * torch.rsqrt(z.abs() + eps)
    return z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(eps)


class CompactBilinearHead(nn.Module):
    """Two-stream (or one-stream) compact bilinear head over named streams.

    For each stream in ``multipath_streams`` (default: ``motion`` when present, else every
    stream) the video is cut into ``paths`` equal intervals whose means are fused by a first STCB
    (multi-path temporal fusion, ``paths`` >= 2); every other stream contributes its mean over all
    frames. Each stream vector is batch-normalised before its sketch. The stream vectors are then
    fused by a second STCB into ``out_dim`` (a lone stream vector is fused with itself: compact
    bilinear pooling), scaled by signed square root + L2, and classified by dropout + FC.

    Shapes: ``forward(x {stream: [B, T, d_s]} (or one tensor for one stream), lengths [B])
    -> [B, C]``; ``forward_nodes(nodes {stream: [B, M_s, d_s]})`` with node 0 the mean over all
    frames and nodes 1..paths the path means; ``features(nodes) -> [B, out_dim]``.
    """

    def __init__(
        self,
        *,
        in_features: Mapping[str, int] | None = None,
        num_classes: int = 101,
        out_dim: int = 4096,
        paths: int = 3,
        multipath_streams: tuple[str, ...] | None = None,
        dropout: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        dims = (
            dict(in_features) if in_features is not None else {"appearance": 2048, "motion": 2048}
        )
        if not dims:
            raise ValueError("in_features names no stream")
        if paths < 1:
            raise ValueError(f"paths must be >= 1, got {paths}")
        self.streams = tuple(dims)
        self.in_features = dims
        self.out_features = num_classes
        self.feature_dim = out_dim
        self.paths = paths
        if multipath_streams is None:
            multipath_streams = ("motion",) if "motion" in dims else self.streams
        unknown = [s for s in multipath_streams if s not in dims]
        if unknown:
            raise ValueError(
                f"multipath_streams {unknown!r} are not among the streams {self.streams}"
            )
        self.multipath = tuple(s for s in self.streams if s in multipath_streams and paths > 1)
        self.input_specs = {
            s: Intervals((1, paths)) if s in self.multipath else Intervals((1,))
            for s in self.streams
        }
        self.norms = nn.ModuleDict()
        self.temporal = nn.ModuleDict()
        fused_dims: list[int] = []
        for i, s in enumerate(self.streams):
            self.norms[s] = nn.BatchNorm1d(dims[s])
            if s in self.multipath:
                self.temporal[s] = CompactBilinear(
                    in_features=(dims[s],) * paths, out_features=out_dim, seed=seed + 101 * (i + 1)
                )
                fused_dims.append(out_dim)
            else:
                fused_dims.append(dims[s])
        self.single_multipath = len(self.streams) == 1 and bool(self.multipath)
        if not self.single_multipath:
            if len(fused_dims) == 1:
                fused_dims = fused_dims * 2
            self.fusion = CompactBilinear(
                in_features=tuple(fused_dims), out_features=out_dim, seed=seed
            )
        self.drop = Dropout(dropout)
        self.fc = nn.Linear(out_dim, num_classes)

    def _as_streams(self, x: NodeInput | Mapping[str, NodeInput]) -> Mapping[str, NodeInput]:
        if isinstance(x, torch.Tensor | PyramidLeaves):
            if len(self.streams) != 1:
                raise ValueError(f"this head fuses streams {self.streams}; pass a dict of them")
            return {self.streams[0]: x}
        missing = [s for s in self.streams if s not in x]
        if missing:
            raise KeyError(f"missing streams {missing!r}; this head reads {self.streams}")
        return x

    def stream_vector(self, stream: str, nodes: NodeInput) -> torch.Tensor:
        """The vector a stream contributes to the final fusion: ``[B, out_dim]`` or ``[B, d]``."""
        if isinstance(nodes, PyramidLeaves):
            nodes = nodes.nodes()
        spec = self.input_specs[stream]
        d = self.in_features[stream]
        if nodes.dim() != 3 or tuple(nodes.shape[1:]) != (spec.count, d):
            raise ValueError(
                f"stream {stream!r} nodes must be [B, {spec.count}, {d}], got {tuple(nodes.shape)}"
            )
        b, m, _ = nodes.shape
        normed = self.norms[stream](nodes.reshape(b * m, d)).view(b, m, d)  # [B, M, d]
        if stream in self.multipath:
            return self.temporal[stream](*normed[:, 1:].unbind(dim=1))  # [B, out_dim]
        return normed[:, 0]  # [B, d]

    def features(self, nodes: NodeInput | Mapping[str, NodeInput]) -> torch.Tensor:
        streams = self._as_streams(nodes)
        vectors = [self.stream_vector(s, streams[s]) for s in self.streams]
        if self.single_multipath:
            fused = vectors[0]
        else:
            fused = self.fusion(*(vectors * 2 if len(vectors) == 1 else vectors))
        return signed_sqrt_l2(fused)  # [B, out_dim]

    def forward_nodes(self, nodes: NodeInput | Mapping[str, NodeInput]) -> torch.Tensor:
        return self.fc(self.drop(self.features(nodes)))  # [B, C]

    def forward(
        self, x: torch.Tensor | Mapping[str, torch.Tensor], lengths: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            if len(self.streams) != 1:
                raise ValueError(f"this head fuses streams {self.streams}; pass a dict of them")
            x = {self.streams[0]: x}
        missing = [s for s in self.streams if s not in x]
        if missing:
            raise KeyError(f"missing streams {missing!r}; this head reads {self.streams}")
        nodes = {s: batch_pool_intervals(x[s], lengths, self.input_specs[s]) for s in self.streams}
        return self.forward_nodes(nodes)
