"""Naive loop references for the heads (float64, one video and one node at a time)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from aggregator.heads import (
    AdaptiveTemporalPooling,
    AttentiveProbe,
    CompactBilinear,
    CompactBilinearHead,
    GlobalPool,
    TemporalPyramid,
    TemporalPyramidPooling,
)


def naive_bounds(t: int, parts: tuple[int, ...]) -> list[tuple[int, int]]:
    """The node rule written out: part k of p covers [floor((k-1)T/p), max(floor(kT/p), s+1))."""
    out = []
    for p in parts:
        for k in range(1, p + 1):
            s = min((k - 1) * t // p, t - 1)
            e = min(max(k * t // p, s + 1), t)
            out.append((s, e))
    return out


def naive_pool(x: np.ndarray, length: int, parts: tuple[int, ...], kind: str) -> np.ndarray:
    """``[M, d]`` interval means or maxima of ``x[:length]`` by explicit loops over frames."""
    rows = []
    for s, e in naive_bounds(length, parts):
        acc = np.array(x[s], dtype=np.float64)
        for t in range(s + 1, e):
            acc = np.maximum(acc, x[t]) if kind == "max" else acc + x[t]
        rows.append(acc if kind == "max" else acc / (e - s))
    return np.stack(rows)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def bn_eval(v: np.ndarray, bn: nn.BatchNorm1d, sl: slice = slice(None)) -> np.ndarray:
    """Batch norm in eval mode, feature slice ``sl`` of the layer."""
    assert bn.running_mean is not None and bn.running_var is not None
    mean, var = _np(bn.running_mean)[sl], _np(bn.running_var)[sl]
    return (v - mean) / np.sqrt(var + bn.eps) * _np(bn.weight)[sl] + _np(bn.bias)[sl]


def linear(v: np.ndarray, layer: nn.Linear, rows: slice = slice(None)) -> np.ndarray:
    return _np(layer.weight)[rows] @ v + _np(layer.bias)[rows]


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters, beta and DATP regressor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=gen))
        for name, p in module.named_parameters():
            if name.endswith("beta_hat") or name.endswith("fusion_logits"):
                p.copy_(torch.randn(p.shape, generator=gen))
            if name.endswith("regress.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            if name.endswith("position") or ".norm_" in f".{name}":  # attn: zero/one at init
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return module


def ref_global(head: GlobalPool, x: np.ndarray, length: int) -> np.ndarray:
    pooled = naive_pool(x, length, (1,), head.kind)[0]
    assert isinstance(head.norm, nn.BatchNorm1d)
    return linear(bn_eval(pooled, head.norm), head.fc)


def softmax_rows(a: np.ndarray) -> np.ndarray:
    out = np.empty_like(a)
    for i, row in enumerate(a):
        e = np.array([math.exp(v - row.max()) for v in row])
        out[i] = e / e.sum()
    return out


def ref_tp(head: TemporalPyramid, x: np.ndarray, length: int) -> np.ndarray:
    depth, p_count, nd, d = head.depth, head.pyramids, head.node_dim, head.in_features
    m = (1 << depth) - 1
    beta = softmax_rows(_np(head.beta_hat))
    psi = naive_pool(x, length, tuple(1 << i for i in range(depth)), "mean")
    parts = []
    for p in range(p_count):
        if head.variant == "concat":
            for n in range(m):
                z = linear(psi[n], head.proj, slice(p * nd, (p + 1) * nd))
                start = (p * m + n) * nd
                parts.append(beta[p, n] * bn_eval(z, head.norm, slice(start, start + nd)))
        else:
            pooled = sum(beta[p, n] * psi[n] for n in range(m))
            parts.append(bn_eval(pooled, head.norm, slice(p * d, (p + 1) * d)))
    r = np.concatenate(parts)
    if p_count > 1:
        assert isinstance(head.reduce, nn.Sequential)
        fc1, _, bn = head.reduce
        assert isinstance(fc1, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
        r = bn_eval(np.maximum(linear(r, fc1), 0.0), bn)
    return linear(r, head.fc)


def ref_tpp(head: TemporalPyramidPooling, x: np.ndarray, length: int) -> np.ndarray:
    kind = "max" if head.pooling == "max" else "mean"
    bins = naive_pool(x, length, head.levels, kind)
    return linear(bins.reshape(-1), head.fc)


def ref_datp(head: AdaptiveTemporalPooling, x: np.ndarray, length: int) -> np.ndarray:
    n_seg, k = head.segments, head.gaussians
    seg = naive_pool(x, length, (n_seg,), "mean")
    xn = np.stack([bn_eval(row, head.norm) for row in seg])  # [N, d]
    with torch.no_grad():
        seg = torch.from_numpy(xn[None]).to(head.fc.weight)
        theta = _np(head.regress(head.aux(head.aux_in(seg).transpose(1, 2))))[0]
    if head.weights_model == "discrete":
        w = theta
    else:
        rho = softmax_rows(theta[None, :k])[0]
        mu = theta[k : 2 * k]
        sigma = np.array([math.log1p(math.exp(v)) for v in theta[2 * k :]]) + 0.01
        w = np.zeros(n_seg)
        for i in range(n_seg):
            t = (i + 0.5) / n_seg
            for j in range(k):
                w[i] += (
                    rho[j]
                    / (math.sqrt(2 * math.pi) * sigma[j])
                    * math.exp(-((t - mu[j]) ** 2) / (2 * sigma[j] ** 2))
                )
    scores = [linear(xn[i], head.fc) for i in range(n_seg)]
    if head.scores == "softmax":
        scores = [softmax_rows(s[None])[0] for s in scores]
    norm = math.sqrt(sum(v * v for v in w))
    return sum(w[i] * scores[i] for i in range(n_seg)) / norm


def _layer_norm(v: np.ndarray, ln: nn.LayerNorm) -> np.ndarray:
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return (v - mean) / math.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)


def ref_attn(head: AttentiveProbe, x: np.ndarray, length: int) -> np.ndarray:
    """Queries, heads and segments one at a time: softmax of q.k / sqrt(dh) over the segments."""
    seg = naive_pool(x, length, (head.segments,), "mean")
    toks = [_layer_norm(row, head.norm_in) for row in seg]
    keys = [linear(t, head.k_proj) for t in toks]
    if head.position is not None:
        keys = [k + _np(head.position)[i] for i, k in enumerate(keys)]
    values = [linear(t, head.v_proj) for t in toks]
    dh = head.dim // head.heads
    outs = []
    for q_raw in _np(head.queries):
        q = linear(q_raw, head.q_proj)
        attended = np.zeros(head.dim)
        for h in range(head.heads):
            sl = slice(h * dh, (h + 1) * dh)
            scores = [float(q[sl] @ k[sl]) / math.sqrt(dh) for k in keys]
            top = max(scores)
            w = [math.exp(s - top) for s in scores]
            for i, v in enumerate(values):
                attended[sl] += w[i] / sum(w) * v[sl]
        z = linear(attended, head.out_proj)
        hidden = linear(_layer_norm(z, head.norm_mlp), head.mlp[0])
        gelu = np.array([0.5 * a * (1 + math.erf(a / math.sqrt(2))) for a in hidden])
        z = z + linear(gelu, head.mlp[2])
        outs.append(_layer_norm(z, head.norm_out))
    return linear(np.concatenate(outs), head.fc)


def naive_compact_bilinear(cb: CompactBilinear, vectors: list[np.ndarray]) -> np.ndarray:
    """Count sketches by loops, then circular convolution by loops."""
    d = cb.out_features
    result: np.ndarray | None = None
    for i, v in enumerate(vectors):
        h, s = _np(getattr(cb, f"h{i}")).astype(int), _np(getattr(cb, f"s{i}"))
        sketch = np.zeros(d)
        for j in range(len(v)):
            sketch[h[j]] += s[j] * v[j]
        if result is None:
            result = sketch
            continue
        conv = np.zeros(d)
        for a in range(d):
            for b in range(d):
                conv[(a + b) % d] += result[a] * sketch[b]
        result = conv
    assert result is not None
    return result


def ref_stcb(head: CompactBilinearHead, x: dict[str, np.ndarray], length: int) -> np.ndarray:
    vectors = []
    for s in head.streams:
        spec = head.input_specs[s]
        nodes = naive_pool(x[s], length, spec.parts, "mean")
        bn = head.norms[s]
        assert isinstance(bn, nn.BatchNorm1d)
        normed = [bn_eval(row, bn) for row in nodes]
        if s in head.multipath:
            cb = head.temporal[s]
            assert isinstance(cb, CompactBilinear)
            vectors.append(naive_compact_bilinear(cb, normed[1:]))
        else:
            vectors.append(normed[0])
    if head.single_multipath:
        fused = vectors[0]
    else:
        fused = naive_compact_bilinear(head.fusion, vectors * 2 if len(vectors) == 1 else vectors)
    z = fused / np.sqrt(np.abs(fused) + 1e-6)
    z = z / max(np.linalg.norm(z), 1e-6)
    return linear(z, head.fc)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread (a second one only adds synchronisation, badly so on a
    shared machine). Imported by the test modules that use these references."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
