"""``stpn``: the head of STPN, the spatiotemporal pyramid network, on cached feature maps.

It reads the last convolutional block's output of both backbones, per frame, as spatial maps
``appearance_map [B, T, h, w, C_a]`` and ``motion_map [B, T, h, w, C_m]`` (the map streams of
the store) and builds STPN's three pathways:

- **spatial**: the appearance map averaged over cells and frames (the usual pooled feature);
- **temporal** (multi-path temporal fusion): the motion map averaged over cells gives one motion
  vector per frame; the video is cut into ``paths`` equal intervals whose mean motion vectors are
  fused by a compact bilinear layer (the first STCB);
- **attended** (spatiotemporal attention pooling): in every frame, each cell's appearance vector
  ``a_c`` is fused with its motion counterpart ``g_c`` by a compact bilinear layer (the spatial
  compact-bilinear fusion of the two streams, the second STCB), scaled by a signed square root,
  mapped to one channel by two convolutions over the ``h x w`` grid (``hidden`` channels, ReLU,
  then one), normalised by a softmax over the cells into weights ``alpha_c``; the frame's attended
  feature is ``sum_c alpha_c a_c``, and the video's is the mean over its frames. The guidance
  ``g_c`` is the motion map's cell (``guidance="cell"``) or the temporal pathway's vector at every
  cell (``guidance="video"``, the reading of STPN's figure).

A fourth pathway, **fused**, is optional: the cell-wise fusion ``u_c`` that drives the attention,
averaged over the cells and frames (the two streams' compact bilinear fusion at the last
convolutional layer, without attention).

The pathways are fused by a third compact bilinear layer into ``out_dim``, scaled by signed square
root + L2, and classified by dropout + FC. With ``fusion_constant`` (the default) every pathway
vector is scaled to unit norm and gets a constant 1 appended before that fusion, so the sketch
holds each pathway alone and the product of every subset of pathways, with equal energy: in the
plain product a pathway that carries no class information on some data (a zero-mean,
class-independent vector) multiplies the others' information away, which the constant avoids;
``fusion_constant=False`` is STPN's exact form.
The last attention convolution starts at zero, so the attention starts as average pooling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from aggregator.heads.base import Dropout
from aggregator.heads.stcb import CompactBilinear, signed_sqrt_l2
from aggregator.intervals import Intervals, batch_pool_intervals
from aggregator.streams import MAP_STREAMS

PATHWAYS = ("spatial", "temporal", "attended", "fused")
PAPER_PATHWAYS = ("spatial", "temporal", "attended")
Guidance = Literal["cell", "video"]


def signed_sqrt(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``z / sqrt(|z| + eps)``: the signed square root, continuous with a finite gradient at 0."""
    return z * torch.rsqrt(z.abs() + eps)


class SpatialCompactBilinear(nn.Module):
    """Compact bilinear fusion of two maps, cell by cell.

    Shapes: ``forward(a [N, h, w, p_a], g [N, h, w, p_g] or [N, p_g]) -> [N, h, w, out_features]``;
    a ``[N, p_g]`` guidance is the same vector at every cell.
    """

    def __init__(
        self, *, in_features: tuple[int, int] = (2048, 2048), out_features: int = 512, seed: int = 0
    ) -> None:
        super().__init__()
        self.in_features = tuple(in_features)
        self.out_features = out_features
        self.fusion = CompactBilinear(
            in_features=self.in_features, out_features=out_features, seed=seed
        )

    def forward(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4 or a.shape[3] != self.in_features[0]:
            raise ValueError(f"a must be [N, h, w, {self.in_features[0]}], got {tuple(a.shape)}")
        n, h, w, p = a.shape
        if g.dim() == 2:
            g = g[:, None, None, :].expand(n, h, w, g.shape[1])  # [N, h, w, p_g]
        if g.dim() != 4 or tuple(g.shape) != (n, h, w, self.in_features[1]):
            raise ValueError(
                f"g must be [{n}, {h}, {w}, {self.in_features[1]}] or [{n}, "
                f"{self.in_features[1]}], got {tuple(g.shape)}"
            )
        z = self.fusion(a.reshape(n * h * w, p), g.reshape(n * h * w, g.shape[3]))  # [N h w, d]
        return z.view(n, h, w, self.out_features)


class AttentionPooling(nn.Module):
    """Spatiotemporal attention pooling of one frame's appearance map (STPN, section 3.3).

    ``u_c = signed_sqrt(STCB(a_c, g_c))``; ``e = conv_1x1(relu(conv_kxk(u)))`` (``hidden``
    channels, then one; zero-padded, the grid size is kept); ``alpha = softmax_c(e_c)``;
    output ``sum_c alpha_c a_c``.

    Shapes: ``forward(a [N, h, w, C_a], g [N, h, w, C_g] or [N, C_g]) -> ([N, C_a], alpha
    [N, h, w])``.
    """

    def __init__(
        self,
        *,
        in_features: tuple[int, int] = (2048, 2048),
        fused_dim: int = 512,
        hidden: int = 64,
        kernel_size: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.fusion = SpatialCompactBilinear(
            in_features=in_features, out_features=fused_dim, seed=seed
        )
        self.conv1 = nn.Conv2d(fused_dim, hidden, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(hidden, 1, 1)
        with torch.no_grad():
            self.conv2.weight.zero_()
            self.conv2.bias.zero_()  # type: ignore[union-attr]

    def scores(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention logits ``e [N, h, w]`` before the softmax."""
        u = signed_sqrt(self.fusion(a, g))  # [N, h, w, d]
        hid = F.relu(self.conv1(u.permute(0, 3, 1, 2)))  # [N, hidden, h, w]
        return self.conv2(hid)[:, 0]  # [N, h, w]

    def forward(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, alpha, _ = self.forward_all(a, g)
        return pooled, alpha

    def forward_all(
        self, a: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pooled [N, C_a], alpha [N, h, w], mean over the cells of u [N, fused_dim])``."""
        u = signed_sqrt(self.fusion(a, g))  # [N, h, w, d]
        hid = F.relu(self.conv1(u.permute(0, 3, 1, 2)))  # [N, hidden, h, w]
        e = self.conv2(hid)[:, 0]  # [N, h, w]
        n, h, w = e.shape
        alpha = torch.softmax(e.reshape(n, h * w), dim=1)  # [N, h w]
        pooled = torch.bmm(alpha[:, None, :], a.reshape(n, h * w, a.shape[3]))[:, 0]  # [N, C_a]
        return pooled, alpha.view(n, h, w), u.mean(dim=(1, 2))


class SpatiotemporalPyramid(nn.Module):
    """The ``stpn`` head: spatial, temporal and attended pathways fused by compact bilinear pooling.

    ``in_features`` maps ``appearance_map`` and ``motion_map`` to their channel counts C.
    ``pathways`` chooses which pathways the top fusion takes (all three by default; a lone pathway
    is fused with itself). ``paths`` is the number of intervals of the multi-path temporal fusion
    (1 uses the mean motion vector as it is).

    Shapes: ``forward(x {"appearance_map": [B, T, h, w, C_a], "motion_map": [B, T, h, w, C_m]},
    lengths [B]) -> [B, num_classes]``; ``features(x, lengths) -> [B, out_dim]``;
    ``attention(x, lengths) -> [B, T, h, w]`` (zero past ``lengths``). Frames past ``lengths``
    are never looked at, so padding (even NaN) does not change the output.
    """

    def __init__(
        self,
        *,
        in_features: Mapping[str, int] | None = None,
        num_classes: int = 101,
        out_dim: int = 4096,
        temporal_dim: int = 4096,
        attention_dim: int = 512,
        attention_hidden: int = 64,
        attention_kernel: int = 3,
        paths: int = 3,
        guidance: Guidance = "cell",
        pathways: tuple[str, ...] = PAPER_PATHWAYS,
        fusion_constant: bool = True,
        dropout: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        dims = dict(in_features) if in_features is not None else dict.fromkeys(MAP_STREAMS, 2048)
        if set(dims) != set(MAP_STREAMS):
            raise ValueError(f"in_features must name exactly {MAP_STREAMS}, got {sorted(dims)}")
        if paths < 1:
            raise ValueError(f"paths must be >= 1, got {paths}")
        if guidance not in ("cell", "video"):
            raise ValueError(f"guidance must be 'cell' or 'video', got {guidance!r}")
        bad = [p for p in pathways if p not in PATHWAYS]
        if not pathways or bad or len(set(pathways)) != len(pathways):
            raise ValueError(f"pathways must be distinct names among {PATHWAYS}, got {pathways!r}")
        self.streams = MAP_STREAMS
        self.in_features = {s: int(dims[s]) for s in MAP_STREAMS}
        self.out_features = num_classes
        self.feature_dim = out_dim
        self.paths = paths
        self.guidance = guidance
        self.pathways = tuple(p for p in PATHWAYS if p in pathways)
        c_a, c_m = self.in_features["appearance_map"], self.in_features["motion_map"]
        self.temporal_spec = Intervals((paths,))
        self.motion_norm = nn.BatchNorm1d(c_m)
        self.temporal_fusion: CompactBilinear | None = None
        t_dim = c_m
        if paths > 1:
            self.temporal_fusion = CompactBilinear(
                in_features=(c_m,) * paths, out_features=temporal_dim, seed=seed + 101
            )
            t_dim = temporal_dim
        self.attention = AttentionPooling(
            in_features=(c_a, c_m if guidance == "cell" else t_dim),
            fused_dim=attention_dim,
            hidden=attention_hidden,
            kernel_size=attention_kernel,
            seed=seed + 202,
        )
        self.spatial_norm = nn.BatchNorm1d(c_a)
        self.attended_norm = nn.BatchNorm1d(c_a)
        self.fused_norm = nn.BatchNorm1d(attention_dim)
        self.fusion_constant = fusion_constant
        sizes = {"spatial": c_a, "temporal": t_dim, "attended": c_a, "fused": attention_dim}
        fused = [sizes[p] + int(fusion_constant) for p in self.pathways]
        if len(fused) == 1:
            fused = fused * 2
        self.fusion = CompactBilinear(in_features=tuple(fused), out_features=out_dim, seed=seed)
        self.drop = Dropout(dropout)
        self.fc = nn.Linear(out_dim, num_classes)

    # ------------------------------------------------------------------ inputs
    def _maps(
        self, x: Mapping[str, torch.Tensor], lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        missing = [s for s in MAP_STREAMS if s not in x]
        if missing:
            raise KeyError(f"missing streams {missing!r}; this head reads {MAP_STREAMS}")
        a, m = x["appearance_map"], x["motion_map"]
        for name, v in (("appearance_map", a), ("motion_map", m)):
            if v.dim() != 5 or v.shape[4] != self.in_features[name]:
                raise ValueError(
                    f"{name} must be [B, T, h, w, {self.in_features[name]}], got {tuple(v.shape)}"
                )
        if a.shape[:4] != m.shape[:4]:
            raise ValueError(
                f"appearance_map {tuple(a.shape)} and motion_map {tuple(m.shape)} differ in "
                "[B, T, h, w]"
            )
        b, t = a.shape[:2]
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be [{b}], got shape {tuple(lengths.shape)}")
        lengths = lengths.to(device=a.device, dtype=torch.long)
        if int(lengths.min()) < 1 or int(lengths.max()) > t:
            raise ValueError(f"lengths {lengths.tolist()} must lie in [1, T={t}]")
        return a, m, lengths

    # ------------------------------------------------------------------ pathways
    def temporal_vector(self, m: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Multi-path temporal fusion of padded motion maps ``[B, T, h, w, C_m]`` -> ``[B, t]``."""
        per_frame = m.mean(dim=(2, 3))  # [B, T, C_m]; padding (even NaN) is masked below
        nodes = batch_pool_intervals(per_frame, lengths, self.temporal_spec)  # [B, P, C_m]
        b, p, c = nodes.shape
        normed = self.motion_norm(nodes.reshape(b * p, c)).view(b, p, c)
        if self.temporal_fusion is None:
            return normed[:, 0]  # [B, C_m]
        return self.temporal_fusion(*normed.unbind(dim=1))  # [B, temporal_dim]

    def _attend(
        self, a: torch.Tensor, m: torch.Tensor, lengths: torch.Tensor, temporal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention over the valid frames only: ``(pooled [N, C_a], alpha [N, h, w], fused
        [N, attention_dim])``, N = sum(lengths)."""
        valid = torch.arange(a.shape[1], device=a.device)[None, :] < lengths[:, None]  # [B, T]
        frames = a[valid]  # [N, h, w, C_a], N = sum(lengths)
        # [N, h, w, C_m] (the cell's motion) or [N, t] (the video's temporal vector)
        guide = m[valid] if self.guidance == "cell" else temporal.repeat_interleave(lengths, dim=0)
        return self.attention.forward_all(frames, guide)

    def pathway_vectors(
        self, x: Mapping[str, torch.Tensor], lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The pathways' video vectors before the top fusion (normalised where the head does)."""
        a, m, lengths = self._maps(x, lengths)
        b = a.shape[0]
        out: dict[str, torch.Tensor] = {}
        temporal = self.temporal_vector(m, lengths)
        if "temporal" in self.pathways:
            out["temporal"] = temporal
        if "spatial" in self.pathways:
            valid = torch.arange(a.shape[1], device=a.device)[None, :] < lengths[:, None]
            per_frame = a.mean(dim=(2, 3)).masked_fill(~valid[..., None], 0.0)  # [B, T, C_a]
            mean = per_frame.sum(1) / lengths[:, None].to(a.dtype)  # [B, C_a]
            out["spatial"] = self.spatial_norm(mean)
        if "attended" in self.pathways or "fused" in self.pathways:
            pooled, _, fused = self._attend(a, m, lengths, temporal)  # [N, C_a], [N, d]
            owner = torch.arange(b, device=a.device).repeat_interleave(lengths)  # [N]
            count = lengths[:, None].to(pooled.dtype)
            if "attended" in self.pathways:
                total = pooled.new_zeros(b, pooled.shape[1]).index_add(0, owner, pooled)
                out["attended"] = self.attended_norm(total / count)  # [B, C_a]
            if "fused" in self.pathways:
                total = fused.new_zeros(b, fused.shape[1]).index_add(0, owner, fused)
                out["fused"] = self.fused_norm(total / count)  # [B, attention_dim]
        return out

    # ------------------------------------------------------------------ outputs
    def features(self, x: Mapping[str, torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        vectors = self.pathway_vectors(x, lengths)
        parts = [vectors[p] for p in self.pathways]
        if self.fusion_constant:  # [v / |v|, 1]: every product of a subset of pathways, alike
            parts = [
                torch.cat([F.normalize(v, dim=1), v.new_ones(v.shape[0], 1)], dim=1) for v in parts
            ]
        fused = self.fusion(*(parts * 2 if len(parts) == 1 else parts))
        return signed_sqrt_l2(fused)  # [B, out_dim]

    def forward(self, x: Mapping[str, torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x, lengths)))  # [B, C]

    @torch.no_grad()
    def attention_weights(
        self, x: Mapping[str, torch.Tensor], lengths: torch.Tensor
    ) -> torch.Tensor:
        """The attention weights ``[B, T, h, w]`` of every valid frame (zero past ``lengths``)."""
        a, m, lengths = self._maps(x, lengths)
        temporal = self.temporal_vector(m, lengths)
        _, alpha, _ = self._attend(a, m, lengths, temporal)  # [N, h, w]
        valid = torch.arange(a.shape[1], device=a.device)[None, :] < lengths[:, None]
        out = alpha.new_zeros(a.shape[:4])
        out[valid] = alpha
        return out
