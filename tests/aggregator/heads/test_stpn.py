"""The ``stpn`` head: attention pooling against a naive per-cell loop, padding, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator.heads import build_model
from aggregator.heads.stcb import CompactBilinear
from aggregator.heads.stpn import (
    AttentionPooling,
    SpatialCompactBilinear,
    SpatiotemporalPyramid,
)

DIMS = {"appearance_map": 6, "motion_map": 5}


def naive_compact_bilinear(cb: CompactBilinear, u: list[float], v: list[float]) -> list[float]:
    """Algorithm 1 with loops: count sketches, then their circular convolution (no FFT)."""
    d = cb.out_features
    sketches = []
    for i, vec in enumerate((u, v)):
        h = getattr(cb, f"h{i}").tolist()
        s = getattr(cb, f"s{i}").tolist()
        out = [0.0] * d
        for j, value in enumerate(vec):
            out[h[j]] += s[j] * value
        sketches.append(out)
    x, y = sketches
    return [sum(x[i] * y[(k - i) % d] for i in range(d)) for k in range(d)]


def naive_attention(
    pool: AttentionPooling, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame ``a [h, w, C_a]``, ``g [h, w, C_g]``: every cell, every tap, one at a time."""
    h, w, c_a = a.shape
    cb = pool.fusion.fusion
    u = {}
    for i in range(h):
        for j in range(w):
            z = naive_compact_bilinear(cb, a[i, j].tolist(), g[i, j].tolist())
            u[i, j] = [zk / math.sqrt(abs(zk) + 1e-6) for zk in z]
    w1, b1 = pool.conv1.weight.tolist(), pool.conv1.bias.tolist()
    w2, b2 = pool.conv2.weight.tolist(), pool.conv2.bias.tolist()
    k = len(w1[0][0])
    r = k // 2
    scores = {}
    for i in range(h):
        for j in range(w):
            hidden = []
            for o in range(len(w1)):
                acc = b1[o]
                for di in range(k):
                    for dj in range(k):
                        ii, jj = i + di - r, j + dj - r
                        if 0 <= ii < h and 0 <= jj < w:
                            acc += sum(
                                w1[o][c][di][dj] * u[ii, jj][c] for c in range(len(u[ii, jj]))
                            )
                hidden.append(max(acc, 0.0))
            scores[i, j] = b2[0] + sum(w2[0][o][0][0] * hidden[o] for o in range(len(hidden)))
    top = max(scores.values())
    expo = {key: math.exp(s - top) for key, s in scores.items()}
    total = sum(expo.values())
    alpha = torch.zeros(h, w, dtype=torch.float64)
    pooled = torch.zeros(c_a, dtype=torch.float64)
    for (i, j), e in expo.items():
        alpha[i, j] = e / total
        pooled += alpha[i, j] * a[i, j].double()
    return pooled, alpha


def _random_attention(**kw: int) -> AttentionPooling:
    torch.manual_seed(3)
    pool = AttentionPooling(in_features=(6, 5), fused_dim=8, hidden=4, **kw).double()
    with torch.no_grad():  # the last conv starts at zero (uniform attention); test a trained one
        pool.conv2.weight.normal_()
        pool.conv2.bias.normal_()
    return pool


@pytest.mark.parametrize("kernel", [1, 3])
def test_attention_pooling_equals_naive_per_cell_loop(kernel: int) -> None:
    pool = _random_attention(kernel_size=kernel)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, 4, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 3, 4, 5, generator=gen, dtype=torch.float64)
    pooled, alpha = pool(a, g)
    assert pooled.shape == (3, 6) and alpha.shape == (3, 3, 4)
    for n in range(3):
        ref_pooled, ref_alpha = naive_attention(pool, a[n], g[n])
        torch.testing.assert_close(alpha[n], ref_alpha, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(pooled[n], ref_pooled, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(alpha, torch.full_like(alpha, 1 / 12))  # the test is not trivial


def test_spatial_fusion_broadcasts_a_video_vector() -> None:
    fuse = SpatialCompactBilinear(in_features=(6, 5), out_features=8).double()
    a = torch.randn(2, 3, 3, 6, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    out = fuse(a, v)
    assert out.shape == (2, 3, 3, 8)
    torch.testing.assert_close(out, fuse(a, v[:, None, None, :].expand(2, 3, 3, 5)))
    with pytest.raises(ValueError, match="g must be"):
        fuse(a, torch.randn(2, 4, dtype=torch.float64))


def test_attention_starts_as_average_pooling() -> None:
    pool = AttentionPooling(in_features=(6, 5), fused_dim=8, hidden=4)
    a, g = torch.randn(2, 3, 3, 6), torch.randn(2, 3, 3, 5)
    pooled, alpha = pool(a, g)
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / 9))
    torch.testing.assert_close(pooled, a.mean(dim=(1, 2)))


def _head(**kw: object) -> SpatiotemporalPyramid:
    torch.manual_seed(1)
    args: dict[str, object] = {
        "in_features": DIMS,
        "num_classes": 4,
        "out_dim": 16,
        "temporal_dim": 12,
        "attention_dim": 8,
        "attention_hidden": 4,
        "dropout": 0.0,
    }
    args.update(kw)
    head = SpatiotemporalPyramid(**args)  # type: ignore[arg-type]
    with torch.no_grad():
        head.attention.conv2.weight.normal_()
    return head


def _batch(lengths: list[int], pad: float = 0.0, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(7)
    t = max(lengths)
    x = {
        s: torch.randn(len(lengths), t, 2, 3, c, generator=gen, dtype=dtype)
        for s, c in DIMS.items()
    }
    for s in x:
        for i, n in enumerate(lengths):
            x[s][i, n:] = pad
    return x, torch.tensor(lengths)


@pytest.mark.parametrize("guidance", ["cell", "video"])
def test_mixed_lengths_equal_each_video_alone(guidance: str) -> None:
    head = _head(guidance=guidance).eval()
    x, lengths = _batch([4, 1, 3])
    out = head(x, lengths)
    assert out.shape == (3, 4)
    for i, n in enumerate(lengths.tolist()):
        alone = head({s: v[i : i + 1, :n] for s, v in x.items()}, torch.tensor([n]))
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_padding_never_changes_the_output(train: bool) -> None:
    head = _head()
    head.train(train)
    x, lengths = _batch([3, 1, 2])
    junk, _ = _batch([3, 1, 2], pad=float("nan"))
    longer = {s: torch.cat([v, torch.full_like(v[:, :2], 1e4)], dim=1) for s, v in x.items()}
    ref = head(x, lengths)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(head(junk, lengths), ref)
    torch.testing.assert_close(head(longer, lengths), ref)
    alpha = head.attention_weights(junk, lengths)
    assert alpha.shape == (3, 3, 2, 3)
    torch.testing.assert_close(alpha.sum(dim=(2, 3)), (torch.arange(3) < lengths[:, None]).float())


def test_one_frame_videos() -> None:
    head = _head().eval()
    x, lengths = _batch([1, 1])
    out = head(x, lengths)
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_pathways_and_paths_variants() -> None:
    x, lengths = _batch([3, 2])
    variants: list[dict[str, object]] = [
        {"pathways": ("attended",)},
        {"pathways": ("spatial", "temporal")},
        {"pathways": ("spatial", "temporal", "attended", "fused")},
        {"fusion_constant": False},
        {"paths": 1},
    ]
    for kw in variants:
        head = _head(**kw).eval()
        assert head(x, lengths).shape == (2, 4)
        assert head.features(x, lengths).shape == (2, 16)


def test_fusion_gradcheck_float64() -> None:
    head = _head(paths=2).double().eval()
    x, lengths = _batch([3, 2], dtype=torch.float64)
    a = x["appearance_map"].clone().requires_grad_(True)
    m = x["motion_map"].clone().requires_grad_(True)

    def f(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return head.features({"appearance_map": a, "motion_map": m}, lengths)

    assert torch.autograd.gradcheck(f, (a, m), eps=1e-6, atol=1e-5, rtol=1e-4)
    pool = _random_attention()
    aa = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    gg = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: pool(p, q)[0], (aa, gg), eps=1e-6, atol=1e-6)


def test_parameters_get_gradients() -> None:
    head = _head().train()
    x, lengths = _batch([3, 2, 2])
    head(x, lengths).sum().backward()
    for name in ("attention.conv1.weight", "attention.conv2.weight", "fc.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_inputs_are_named() -> None:
    head = _head()
    x, lengths = _batch([2, 2])
    with pytest.raises(KeyError, match="motion_map"):
        head({"appearance_map": x["appearance_map"]}, lengths)
    with pytest.raises(ValueError, match="lengths"):
        head(x, torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="appearance_map must be"):
        head({**x, "appearance_map": x["appearance_map"][..., :4]}, lengths)
    with pytest.raises(ValueError, match="in_features"):
        SpatiotemporalPyramid(in_features={"appearance": 4})
    with pytest.raises(ValueError, match="pathways"):
        SpatiotemporalPyramid(pathways=("nodes",))


def test_build_model_makes_stpn() -> None:
    model = build_model("stpn", in_features=DIMS, num_classes=3, head_kwargs={"out_dim": 32})
    assert isinstance(model, SpatiotemporalPyramid)
    assert model.feature_dim == 32 and model.out_features == 3


def test_fused_pathway_is_the_mean_cellwise_fusion() -> None:
    head = _head(pathways=("fused",), fusion_constant=False).eval()
    x, lengths = _batch([3, 2])
    vectors = head.pathway_vectors(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        a, m = x["appearance_map"][i, :n], x["motion_map"][i, :n]
        u = head.attention.fusion(a, m)
        u = u * torch.rsqrt(u.abs() + 1e-6)
        expected = head.fused_norm(u.mean(dim=(0, 1, 2))[None])
        torch.testing.assert_close(vectors["fused"][i : i + 1], expected, rtol=1e-5, atol=1e-6)
