"""Every head against a naive loop reference; padding invariance; the node fast path; gradients."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from aggregator.heads import (
    HEADS,
    AdaptiveTemporalPooling,
    AttentiveProbe,
    CompactBilinearHead,
    GlobalPool,
    NodeHead,
    PyramidLeaves,
    SpatiotemporalPyramid,
    TemporalPyramid,
    TemporalPyramidPooling,
    TwoStream,
    build_model,
)
from aggregator.heads.base import Dropout
from aggregator.intervals import Intervals, pool_intervals, pyramid_mix
from tests.aggregator.reference import (
    one_thread,  # noqa: F401 - autouse fixture
    randomize,
    ref_attn,
    ref_datp,
    ref_global,
    ref_stcb,
    ref_tp,
    ref_tpp,
    softmax_rows,
)

D, C, T_PAD = 6, 5, 40
# T = 1, T < 2^(D-1) = 32 (3, 7, 29) and T = T_PAD, mixed in one batch
LENGTHS = [40, 1, 3, 7, 29]

SINGLE: dict[str, Callable[[], NodeHead]] = {
    "gap": lambda: GlobalPool(in_features=D, num_classes=C),
    "max": lambda: GlobalPool(in_features=D, num_classes=C, kind="max"),
    "tp-concat": lambda: TemporalPyramid(in_features=D, num_classes=C, depth=6, node_dim=4),
    "tp-average": lambda: TemporalPyramid(in_features=D, num_classes=C, depth=6, variant="average"),
    "tp-concat-3pyr": lambda: TemporalPyramid(
        in_features=D, num_classes=C, depth=4, node_dim=3, pyramids=3, hidden=7
    ),
    "tp-average-2pyr": lambda: TemporalPyramid(
        in_features=D, num_classes=C, depth=3, variant="average", pyramids=2, hidden=5
    ),
    "tpp-max": lambda: TemporalPyramidPooling(in_features=D, num_classes=C),
    "tpp-average": lambda: TemporalPyramidPooling(
        in_features=D, num_classes=C, levels=(1, 3), pooling="average"
    ),
    "datp-mog": lambda: AdaptiveTemporalPooling(in_features=D, num_classes=C),
    "datp-k3-softmax": lambda: AdaptiveTemporalPooling(
        in_features=D, num_classes=C, segments=7, gaussians=3, scores="softmax"
    ),
    "datp-discrete": lambda: AdaptiveTemporalPooling(
        in_features=D, num_classes=C, weights="discrete"
    ),
    "attn": lambda: AttentiveProbe(in_features=D, num_classes=C, segments=8, dim=8, heads=2),
    "attn-1q-nopos": lambda: AttentiveProbe(
        in_features=D, num_classes=C, segments=32, queries=1, dim=4, heads=4, positional=False
    ),
}


def reference(head: NodeHead, x: np.ndarray, length: int) -> np.ndarray:
    if isinstance(head, GlobalPool):
        return ref_global(head, x, length)
    if isinstance(head, TemporalPyramid):
        return ref_tp(head, x, length)
    if isinstance(head, TemporalPyramidPooling):
        return ref_tpp(head, x, length)
    if isinstance(head, AttentiveProbe):
        return ref_attn(head, x, length)
    assert isinstance(head, AdaptiveTemporalPooling)
    return ref_datp(head, x, length)


def frames(seed: int = 0, d: int = D) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded batch (zeros past lengths), the same batch with junk past lengths, lengths."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(LENGTHS), T_PAD, d, generator=gen, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)
    valid = torch.arange(T_PAD)[None, :] < lengths[:, None]
    clean = x.masked_fill(~valid[..., None], 0.0)
    junk = torch.where(valid[..., None], x, 1e6 * torch.randn(x.shape, generator=gen).double())
    junk[1, -1, 0] = float("nan")
    return clean, junk, lengths


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_head_matches_naive_reference(name: str) -> None:
    head = randomize(SINGLE[name]().double(), seed=1).eval()
    assert isinstance(head, NodeHead)
    clean, _, lengths = frames()
    with torch.no_grad():
        got = head(clean, lengths).numpy()
    assert got.shape == (len(LENGTHS), C) and head.out_features == C
    for b, n in enumerate(LENGTHS):
        want = reference(head, clean[b].numpy(), n)
        np.testing.assert_allclose(got[b], want, rtol=1e-9, atol=1e-9, err_msg=f"video {b}")


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_junk_past_lengths_changes_nothing(name: str) -> None:
    head = randomize(SINGLE[name]().double(), seed=2)
    clean, junk, lengths = frames(seed=3)
    for train in (False, True):
        head.train(train)
        torch.manual_seed(0)
        a = head(clean, lengths)
        torch.manual_seed(0)
        b = head(junk, lengths)
        assert torch.isfinite(b).all()
        assert torch.equal(a, b), f"train={train}"


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_node_fast_path_equals_frames(name: str) -> None:
    """forward(frames) == forward_nodes(summaries computed per video from the unpadded frames)."""
    head = randomize(SINGLE[name](), seed=4).eval()
    clean, _, lengths = frames(seed=5)
    x = clean.float()
    nodes = torch.stack(
        [
            torch.from_numpy(pool_intervals(x[b, :n].numpy(), head.input_spec))
            for b, n in enumerate(LENGTHS)
        ]
    )
    with torch.no_grad():
        slow = head(x, lengths)
        fast = head.forward_nodes(nodes)
        feats = head.features(nodes)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert feats.shape == (len(LENGTHS), head.feature_dim)


def test_every_registered_head_is_covered() -> None:
    covered = {type(f()) for f in SINGLE.values()} | {CompactBilinearHead, SpatiotemporalPyramid}
    assert set(HEADS.values()) == covered


# State dicts of two-stream gap and max models (appearance d=3, motion d=2, C=2) as the former
# GlobalAveragePool and GlobalMaxPool classes saved them, and their eval logits on the inputs of
# the test below: run directories written before the two became one GlobalPool class must load
# and answer the same.
OLD_STATES: dict[str, dict[str, object]] = {
    "gap": {
        "fusion_logits": [0.302, -0.277],
        "heads.appearance.norm.weight": [1.186, 1.105, 1.306],
        "heads.appearance.norm.bias": [-0.55, -0.664, 0.013],
        "heads.appearance.norm.running_mean": [0.661, 0.267, 0.062],
        "heads.appearance.norm.running_var": [1.07, 0.939, 1.139],
        "heads.appearance.norm.num_batches_tracked": 0,
        "heads.appearance.fc.weight": [[0.108, -0.097, -0.095], [-0.264, 0.222, -0.342]],
        "heads.appearance.fc.bias": [0.212, 0.292],
        "heads.motion.norm.weight": [1.193, 0.471],
        "heads.motion.norm.bias": [0.068, -0.071],
        "heads.motion.norm.running_mean": [1.324, -0.101],
        "heads.motion.norm.running_var": [1.272, 0.511],
        "heads.motion.norm.num_batches_tracked": 0,
        "heads.motion.fc.weight": [[0.506, 0.264], [-0.7, -0.459]],
        "heads.motion.fc.bias": [0.353, 0.148],
    },
    "max": {
        "fusion_logits": [-0.447, -1.769],
        "heads.appearance.norm.weight": [0.638, 0.976, 1.237],
        "heads.appearance.norm.bias": [-0.233, -0.36, 0.277],
        "heads.appearance.norm.running_mean": [0.392, -0.224, -0.32],
        "heads.appearance.norm.running_var": [1.114, 0.557, 1.066],
        "heads.appearance.norm.num_batches_tracked": 0,
        "heads.appearance.fc.weight": [[-0.45, -0.332, 0.543], [0.389, -0.252, -0.145]],
        "heads.appearance.fc.bias": [-0.55, -0.01],
        "heads.motion.norm.weight": [0.915, 1.286],
        "heads.motion.norm.bias": [0.106, -0.122],
        "heads.motion.norm.running_mean": [-1.324, 0.172],
        "heads.motion.norm.running_var": [0.72, 0.717],
        "heads.motion.norm.num_batches_tracked": 0,
        "heads.motion.fc.weight": [[-0.532, -0.545], [-0.039, 0.106]],
        "heads.motion.fc.bias": [-0.29, 0.42],
    },
}
OLD_LOGITS = {
    "gap": [[-0.991551, -0.463626], [-1.164978, -0.373864]],
    "max": [[-0.568708, -0.835302], [-0.5306, -0.887344]],
}


@pytest.mark.parametrize("head", ["gap", "max"])
def test_state_dicts_of_the_former_gap_and_max_classes_load(head: str) -> None:
    x = {
        "appearance": torch.arange(24.0).reshape(2, 4, 3).sin(),
        "motion": torch.arange(16.0).reshape(2, 4, 2).cos(),
    }
    model = build_model(head, in_features={"appearance": 3, "motion": 2}, num_classes=2)
    model.load_state_dict({k: torch.tensor(v) for k, v in OLD_STATES[head].items()}, strict=True)
    model.eval()
    assert all(isinstance(h, GlobalPool) for h in model.heads.values())
    with torch.no_grad():
        logits = model(x, torch.tensor([4, 2]))
    torch.testing.assert_close(logits, torch.tensor(OLD_LOGITS[head]), rtol=0, atol=2e-6)


def test_head_names_fix_the_global_pool_kind() -> None:
    gap = build_model("gap", in_features={"appearance": 3}, num_classes=2)
    mx = build_model("max", in_features={"appearance": 3}, num_classes=2)
    assert [h.kind for h in gap.heads.values()] == ["mean"]
    assert [h.kind for h in mx.heads.values()] == ["max"]
    with pytest.raises(ValueError, match="kind='max'"):
        build_model("max", in_features={"a": 3}, num_classes=2, head_kwargs={"kind": "mean"})
    with pytest.raises(ValueError, match="kind must be"):
        GlobalPool(in_features=3, num_classes=2, kind="median")  # type: ignore[arg-type]


def test_shape_errors_name_the_shapes() -> None:
    head = TemporalPyramid(in_features=D, num_classes=C, depth=3)
    with pytest.raises(ValueError, match=r"nodes \[B, 7, 6\]"):
        head.forward_nodes(torch.zeros(2, 6, D))
    with pytest.raises(ValueError, match=r"x \[B, T, 6\]"):
        head(torch.zeros(2, 5, D + 1), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="variant"):
        TemporalPyramid(variant="sum")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ beta
def test_beta_stays_on_the_simplex_under_large_steps() -> None:
    torch.manual_seed(0)
    head = TemporalPyramid(in_features=D, num_classes=C, depth=4, node_dim=3, pyramids=2)
    opt = torch.optim.SGD([head.beta_hat], lr=50.0)
    x, _, lengths = frames(seed=6)
    y = torch.arange(len(LENGTHS)) % C
    for _ in range(20):
        loss = nn.functional.cross_entropy(head(x.float(), lengths), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    beta = head.beta_matrix()
    assert beta.shape == (2, 15)
    assert (beta >= 0).all()
    torch.testing.assert_close(beta.sum(dim=1), torch.ones(2, dtype=beta.dtype))
    assert not torch.allclose(beta, torch.full_like(beta, 1 / 15), atol=1e-3)  # it did move
    levels = head.beta(0)
    assert [len(lv) for lv in levels] == [1, 2, 4, 8]
    assert math.isclose(sum(map(sum, levels)), 1.0, rel_tol=1e-6)
    assert math.isclose(sum(map(sum, head.beta())), 1.0, rel_tol=1e-6)  # mean of pyramids


@pytest.mark.parametrize("variant", ["concat", "average"])
def test_tp_pooling_gradcheck_float64(variant: str) -> None:
    """Gradients through beta = softmax(beta_hat) (Eq. 5) and the node maps, in float64."""
    torch.manual_seed(0)
    head = randomize(
        TemporalPyramid(in_features=3, num_classes=2, depth=3, variant=variant, node_dim=2),  # type: ignore[arg-type]
        seed=7,
    ).double()
    head.eval()
    del head.beta_hat  # drive beta_hat from outside to check its gradient too

    def pooled(nodes: torch.Tensor, beta_hat: torch.Tensor) -> torch.Tensor:
        head.beta_hat = beta_hat  # type: ignore[assignment]
        return head.pyramid_representations(nodes)

    nodes = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    beta_hat = torch.randn(1, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pooled, (nodes, beta_hat))


def test_softmax_jacobian_is_eq5() -> None:
    """d beta_p / d beta_hat_k = beta_k (delta_pk - beta_p) for h = exp (the multiple aggregation
    paper, Eq. 5)."""
    head = TemporalPyramid(in_features=2, num_classes=2, depth=3)
    beta_hat = torch.randn(7, dtype=torch.float64)

    def beta_of(bh: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            head.beta_hat.data = bh[None].float()
        return torch.softmax(bh, dim=0)

    jac = torch.autograd.functional.jacobian(beta_of, beta_hat)
    beta = softmax_rows(beta_hat[None].numpy())[0]
    want = np.array([[beta[k] * ((p == k) - beta[p]) for k in range(7)] for p in range(7)])
    np.testing.assert_allclose(jac.numpy(), want, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ fusion
def test_two_stream_fusion_is_a_convex_combination() -> None:
    torch.manual_seed(0)
    model = build_model(
        "tp",
        in_features={"appearance": D, "motion": D + 2},
        num_classes=C,
        head_kwargs={"depth": 3, "node_dim": 4},
    )
    assert isinstance(model, TwoStream)
    with torch.no_grad():
        model.fusion_logits.copy_(torch.tensor([0.3, -1.2]))
    model.eval()
    x, _, lengths = frames(seed=8)
    xm, _, _ = frames(seed=9, d=D + 2)
    feats = {"appearance": x.float(), "motion": xm.float()}
    w = model.fusion_weights()
    assert set(w) == {"appearance", "motion"} and all(v >= 0 for v in w.values())
    assert math.isclose(sum(w.values()), 1.0, rel_tol=1e-6)
    with torch.no_grad():
        got = model(feats, lengths)
        parts = {s: model.stream_head(s)(feats[s], lengths) for s in model.streams}
    # learned weights mix the streams' probabilities; the output is log p
    want = w["appearance"] * torch.softmax(parts["appearance"], 1) + w["motion"] * torch.softmax(
        parts["motion"], 1
    )
    torch.testing.assert_close(got, torch.log(want))
    with pytest.raises(KeyError, match="motion"):
        model({"appearance": x.float()}, lengths)


def test_fixed_fusion_weights_do_not_train() -> None:
    model = build_model(
        "tpp",
        in_features={"appearance": D, "motion": D},
        num_classes=C,
        fusion="fixed",
        fusion_weights={"appearance": 1.0, "motion": 1.0},
    )
    assert isinstance(model, TwoStream)
    assert model.fusion_weights() == {"appearance": 0.5, "motion": 0.5}
    assert not any("fusion" in name for name, _ in model.named_parameters())


def test_two_stream_embedding_inner_product_is_weighted_cosine() -> None:
    torch.manual_seed(1)
    model = build_model("gap", in_features={"appearance": D, "motion": D}, num_classes=C).eval()
    assert isinstance(model, TwoStream)
    nodes = {s: torch.randn(2, 1, D) for s in model.streams}
    emb = model.features(nodes)
    w = model.fusion_weights()
    cos = sum(
        w[s]
        * torch.nn.functional.cosine_similarity(
            model.stream_head(s).features(nodes[s])[0:1],
            model.stream_head(s).features(nodes[s])[1:2],
        )
        for s in model.streams
    )
    torch.testing.assert_close(emb[0] @ emb[1], cos[0])


# ------------------------------------------------------------------------------------ datp
def test_datp_starts_from_the_paper_initialisation() -> None:
    head = AdaptiveTemporalPooling(in_features=D, num_classes=C, segments=10, gaussians=2).eval()
    nodes = torch.randn(3, 10, D)
    rho, mu, sigma = head.mixture(nodes)
    torch.testing.assert_close(rho, torch.full((3, 2), 0.5))
    torch.testing.assert_close(mu, torch.tensor([[1 / 3, 2 / 3]]).expand(3, 2))
    torch.testing.assert_close(sigma, torch.full((3, 2), 0.2))
    torch.testing.assert_close(head.segment_times(), (torch.arange(10) + 0.5) / 10)


def test_datp_embedding_is_the_pooled_segment_features() -> None:
    """With logit scores, S = W f + b sum(w)/||w|| where f = features(nodes)."""
    head = randomize(AdaptiveTemporalPooling(in_features=D, num_classes=C), seed=3).eval()
    nodes = torch.randn(4, 10, D)
    with torch.no_grad():
        f = head.features(nodes)
        w = head.temporal_weights(nodes)
        scale = w.sum(1, keepdim=True) / w.norm(dim=1, keepdim=True)
        torch.testing.assert_close(
            head.forward_nodes(nodes), f @ head.fc.weight.T + scale * head.fc.bias
        )


# ------------------------------------------------------------------------------------ stcb
STCB_CASES = {
    "two-streams": ({"appearance": 5, "motion": 4}, None, 3),
    "one-stream-multipath": ({"motion": 4}, None, 3),
    "one-stream-bilinear": ({"appearance": 5}, (), 3),
    "both-multipath": ({"appearance": 3, "motion": 4}, ("appearance", "motion"), 2),
}


@pytest.mark.parametrize("case", sorted(STCB_CASES))
def test_stcb_matches_naive_reference(case: str) -> None:
    dims, multipath, paths = STCB_CASES[case]
    head = CompactBilinearHead(
        in_features=dims,
        num_classes=C,
        out_dim=16,
        paths=paths,
        multipath_streams=multipath,
        seed=3,
    )
    head = randomize(head.double(), seed=5).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor(LENGTHS)
    valid = torch.arange(T_PAD)[None, :] < lengths[:, None]
    x = {
        s: torch.randn(len(LENGTHS), T_PAD, d, generator=gen, dtype=torch.float64)
        for s, d in dims.items()
    }
    clean = {s: v.masked_fill(~valid[..., None], 0.0) for s, v in x.items()}
    with torch.no_grad():
        got = head(clean if len(dims) > 1 else next(iter(clean.values())), lengths).numpy()
        junk = head(x, lengths).numpy()
    np.testing.assert_array_equal(got, junk)  # padding never matters
    for b, n in enumerate(LENGTHS):
        want = ref_stcb(head, {s: v[b].numpy() for s, v in clean.items()}, n)
        np.testing.assert_allclose(got[b], want, rtol=1e-9, atol=1e-9)


def test_stcb_defaults_follow_the_paper() -> None:
    head = CompactBilinearHead()
    assert head.streams == ("appearance", "motion")
    assert head.feature_dim == 4096 and head.multipath == ("motion",)
    assert head.input_specs["motion"].parts == (1, 3)
    assert head.input_specs["appearance"].parts == (1,)


@pytest.mark.parametrize("name", ["tp-concat", "tp-average", "tp-concat-3pyr", "tp-average-2pyr"])
def test_tp_from_pyramid_leaves_equals_from_nodes(name: str) -> None:
    """The leaf fast path (linear maps on the last level, mixed after) is exact, T < L included."""
    head = randomize(SINGLE[name]().double(), seed=6).eval()
    assert isinstance(head, TemporalPyramid)
    clean, _, _ = frames(seed=7)
    n_leaves = 1 << (head.depth - 1)
    leaves, mixes, nodes = [], [], []
    for b, n in enumerate(LENGTHS):
        x = clean[b, :n].numpy()
        leaves.append(pool_intervals(x, Intervals((n_leaves,))))
        nodes.append(pool_intervals(x, head.input_spec))
        mixes.append(pyramid_mix(n, head.depth))
    packed = PyramidLeaves(
        torch.from_numpy(np.stack(leaves)).double(), torch.from_numpy(np.stack(mixes))
    )
    with torch.no_grad():
        via_leaves = head.forward_nodes(packed.to("cpu"))
        via_nodes = head.forward_nodes(torch.from_numpy(np.stack(nodes)).double())
        feats = head.features(packed)
    torch.testing.assert_close(via_leaves, via_nodes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        feats, head.features(torch.from_numpy(np.stack(nodes)).double()), rtol=1e-5, atol=1e-6
    )
    # heads without a leaf path take them too (mixed back into nodes)
    gap = GlobalPool(in_features=D, num_classes=C).double().eval()
    one = PyramidLeaves(packed.leaves, packed.mix[:, :1])
    torch.testing.assert_close(gap.forward_nodes(one), gap.forward_nodes(packed.nodes()[:, :1]))
    with pytest.raises(ValueError, match="leaves"):
        head.forward_nodes(PyramidLeaves(packed.leaves[:, :-1], packed.mix[:, :, :-1]))


def test_dropout_keeps_the_expectation() -> None:
    drop = Dropout(0.8)
    x = torch.ones(200, 500)
    torch.manual_seed(0)
    y = drop(x)
    kept = (y != 0).float().mean()
    assert abs(float(kept) - 0.2) < 0.01  # 100,000 draws: sd 0.0013
    for lane in range(4):  # each 16-bit lane of the random words is fair (25,000 draws each)
        assert abs(float((y.view(-1)[lane::4] != 0).float().mean()) - 0.2) < 0.012
    q = (65536 - round(0.8 * 65536)) / 65536  # the keep probability, on a 2^-16 grid
    assert abs(q - 0.2) < 2**-16
    assert torch.allclose(y[y != 0], torch.tensor(1 / q))
    assert abs(float(y.mean()) - 1.0) < 0.05  # sd of the mean: 2 / sqrt(100,000)
    # masks differ across calls and elements; gradients flow through kept elements only
    x2 = torch.ones(4, 1000, requires_grad=True)
    out = Dropout(0.5)(x2)
    out.sum().backward()
    assert x2.grad is not None
    torch.testing.assert_close(x2.grad, out.detach())
    assert not torch.equal(out[0], out[1])
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match=r"got 1\.5"):
        Dropout(1.5)


def test_running_moments_equal_the_population_moments_far_from_zero() -> None:
    from aggregator.heads.standardize import RunningMoments

    gen = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(300, 5, generator=gen, dtype=torch.float64) * torch.arange(1.0, 6.0)
    moments = RunningMoments()
    for part in torch.split(x, [7, 93, 200]):
        moments.add("appearance", part.float().unsqueeze(0))  # [1, n, d] like node batches
    mean, std = moments.result()["appearance"]
    np.testing.assert_allclose(mean.numpy(), x.float().double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        std.numpy(), x.float().double().std(0, correction=0).numpy(), rtol=1e-4
    )
