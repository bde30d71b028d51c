"""DATP's mixture pooling against the paper's analytic gradients; compact bilinear statistics;
both heads on one-dimensional and constant inputs."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from aggregator.degenerate import constant_features
from aggregator.heads import CompactBilinear
from aggregator.heads.datp import (
    AdaptiveTemporalPooling,
    mixture_weights,
    relative_mixture_weights,
    weighted_pool,
)
from aggregator.heads.standardize import MIN_STD
from aggregator.train import train_run
from storage import FeatureStore
from tests.aggregator.reference import (
    naive_compact_bilinear,
    one_thread,  # noqa: F401 - autouse fixture
)


def gaussian(t: float, mu: float, sigma: float) -> float:
    return math.exp(-((t - mu) ** 2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)


def test_mixture_weight_gradients_are_eq2() -> None:
    """dw_i/drho_j = N_ti(mu_j, s_j^2); dw_i/dmu_j = rho_j N (t_i - mu_j)/s_j^2;
    dw_i/ds_j = rho_j N (1/s_j) [(t_i - mu_j)^2 / s_j^2 - 1]  (DATP, Eq. 2)."""
    n, k = 10, 3
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    rho = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    mu = torch.tensor([[0.25, 0.5, 0.9]], dtype=torch.float64)
    sigma = torch.tensor([[0.2, 0.07, 0.35]], dtype=torch.float64)
    j_rho, j_mu, j_sigma = jacobian(
        lambda r, m, s: mixture_weights(t, r, m, s)[0], (rho, mu, sigma)
    )
    w = mixture_weights(t, rho, mu, sigma)[0]
    for i in range(n):
        ti = float(t[i])
        want_w = 0.0
        for j in range(k):
            r, m, s = float(rho[0, j]), float(mu[0, j]), float(sigma[0, j])
            g = gaussian(ti, m, s)
            want_w += r * g
            assert math.isclose(float(j_rho[i, 0, j]), g, rel_tol=1e-12)
            assert math.isclose(float(j_mu[i, 0, j]), r * g * (ti - m) / s**2, rel_tol=1e-10)
            want_s = r * g / s * ((ti - m) ** 2 / s**2 - 1)
            assert math.isclose(float(j_sigma[i, 0, j]), want_s, rel_tol=1e-10, abs_tol=1e-14)
        assert math.isclose(float(w[i]), want_w, rel_tol=1e-12)


def test_weighted_pool_gradients_are_eq4() -> None:
    """dS/dI_i = w_i / ||w||; dS[c]/dw_i = (||w||^2 I_i[c] - w_i sum_j w_j I_j[c]) / ||w||^3
    (DATP, Eq. 4; the paper's dS/dw_i is the sum of the latter over c)."""
    torch.manual_seed(0)
    n, c = 6, 4
    scores = torch.randn(1, n, c, dtype=torch.float64)
    w = torch.rand(1, n, dtype=torch.float64) + 0.1
    j_scores, j_w = jacobian(lambda s, v: weighted_pool(s, v)[0], (scores, w))
    norm = float(w.norm())
    for cc in range(c):
        for i in range(n):
            for c2 in range(c):
                want = float(w[0, i]) / norm if c2 == cc else 0.0
                assert math.isclose(float(j_scores[cc, 0, i, c2]), want, abs_tol=1e-14)
            mix = sum(float(w[0, j] * scores[0, j, cc]) for j in range(n))
            want_w = (norm**2 * float(scores[0, i, cc]) - float(w[0, i]) * mix) / norm**3
            assert math.isclose(float(j_w[cc, 0, i]), want_w, rel_tol=1e-10, abs_tol=1e-14)
    # the paper's form: gradient of sum_c S[c] with respect to w_i
    summed = j_w.sum(dim=0)[0]
    for i in range(n):
        want = sum(
            (norm**2 * float(scores[0, i, k]) - float(w[0, i]) * float(scores[0, :, k] @ w[0]))
            / norm**3
            for k in range(c)
        )
        assert math.isclose(float(summed[i]), want, rel_tol=1e-10)


def test_datp_pooling_gradcheck_float64() -> None:
    torch.manual_seed(1)
    t = (torch.arange(5, dtype=torch.float64) + 0.5) / 5
    args = (
        torch.rand(2, 2, dtype=torch.float64, requires_grad=True),
        torch.rand(2, 2, dtype=torch.float64, requires_grad=True),
        (0.1 + torch.rand(2, 2, dtype=torch.float64)).requires_grad_(),
        torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True),
    )

    def pooled(rho: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, s: torch.Tensor):
        return weighted_pool(s, mixture_weights(t, rho, mu, sigma))

    assert torch.autograd.gradcheck(pooled, args)


def test_relative_weights_pool_as_eq3_and_never_vanish() -> None:
    """The pooling's weights are Eq. 1's divided by their largest (Eq. 3 is unchanged); where
    the mixture drifts off [0, 1] and Eq. 1 underflows to zero at every segment (the pooled
    features, logits and gradients were then all 0), the head still pools onto the nearest
    segment, tells videos apart and its classifier learns."""
    t = (torch.arange(10, dtype=torch.float64) + 0.5) / 10
    rho = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    mu = torch.tensor([[0.2, 0.9]], dtype=torch.float64)
    sigma = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    w = mixture_weights(t, rho, mu, sigma)
    rel = relative_mixture_weights(t, rho.log(), mu, sigma)
    torch.testing.assert_close(rel * w.max(), w)
    scores = torch.randn(1, 10, 4, dtype=torch.float64)
    torch.testing.assert_close(weighted_pool(scores, rel), weighted_pool(scores, w))

    head = AdaptiveTemporalPooling(in_features=3, num_classes=4, segments=10, gaussians=2)
    with torch.no_grad():  # means far right of [0, 1], narrow: Eq. 1 is 0 at every segment
        head.regress.bias.copy_(torch.tensor([0.0, 0.0, 6.0, 7.0, -4.0, -4.0]))
    nodes = torch.randn(6, 10, 3)
    head.eval()
    assert float(head.temporal_weights(nodes).abs().max()) == 0.0
    head.train()
    logits = head.forward_nodes(nodes)
    assert float(logits.std(0).max()) > 0
    F.cross_entropy(logits, torch.arange(6) % 4).backward()
    assert head.fc.weight.grad is not None and float(head.fc.weight.grad.abs().max()) > 0


# ------------------------------------------------------------------------------- compact bilinear
def test_compact_bilinear_matches_loops_and_keeps_its_hashes() -> None:
    cb = CompactBilinear(in_features=(7, 5, 4), out_features=12, seed=3).double()
    vs = [torch.randn(2, p, dtype=torch.float64) for p in (7, 5, 4)]
    got = cb(*vs)
    for b in range(2):
        want = naive_compact_bilinear(cb, [v[b].numpy() for v in vs])
        np.testing.assert_allclose(got[b].detach().numpy(), want, rtol=1e-10, atol=1e-12)
    # same seed -> same sketch; the hashes travel in the state dict
    again = CompactBilinear(in_features=(7, 5, 4), out_features=12, seed=3).double()
    torch.testing.assert_close(again(*vs), got)
    other = CompactBilinear(in_features=(7, 5, 4), out_features=12, seed=4).double()
    other.load_state_dict(cb.state_dict())
    torch.testing.assert_close(other(*vs), got)
    h0 = cb.h0
    assert isinstance(h0, torch.Tensor) and h0.dtype == torch.long
    assert int(h0.min()) >= 0 and int(h0.max()) < 12


def test_compact_bilinear_gradcheck_float64() -> None:
    cb = CompactBilinear(in_features=(4, 3), out_features=8, seed=0).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cb, (x, y))


def test_sketched_inner_product_is_unbiased_for_the_outer_product() -> None:
    """Mean over random sketches of <phi(x, y), phi(x', y')> -> <x, x'><y, y'>.

    With fully random h, s the estimate is the target plus cross terms of mean zero. A cross term
    survives only when two index pairs collide (probability 1/d) and correlates only with itself
    and with its swapped partner, so the variance is at most about
    2 (||x||^2 ||y||^2 ||x'||^2 ||y'||^2 + <x,x'>^2 <y,y'>^2) / d. With R sketches the mean must lie
    within 5 standard errors (estimated from the sample) of the target (false alarm ~6e-7; the
    seeds are fixed anyway) and the sample variance within 3x the bound. Features are
    non-negative like ResNet outputs; then a sketch that dropped the signs is off by ~270 standard
    errors and one that shared its hash between the inputs by ~40 (checked when writing this).
    """
    gen = np.random.default_rng(0)
    x, y = np.abs(gen.normal(size=12)), np.abs(gen.normal(size=9))
    x2, y2 = np.abs(x + 0.6 * gen.normal(size=12)), np.abs(y + 0.6 * gen.normal(size=9))
    target = float(x @ x2) * float(y @ y2)
    d, r = 32, 3000
    a = torch.from_numpy(np.stack([x, x2]))
    b = torch.from_numpy(np.stack([y, y2]))
    est = np.empty(r)
    for i in range(r):
        phi = CompactBilinear(in_features=(12, 9), out_features=d, seed=i).double()(a, b)
        est[i] = float(phi[0] @ phi[1])
    se = est.std(ddof=1) / math.sqrt(r)
    assert abs(est.mean() - target) <= 5 * se, (est.mean(), target, se)
    bound = ((x @ x) * (y @ y) * (x2 @ x2) * (y2 @ y2) + target**2) / d
    assert est.var(ddof=1) <= 3 * bound
    assert est.std() > 0.05 * abs(target)  # single sketches do err: the mean is what converges


# ------------------------------------------------------------------------------- degenerate inputs
FAST: dict[str, Any] = {"threads": 1, "device": "cpu", "make_plots": False}


def _scalar_store(path: Path, level: Callable[[int, str], float], noise: float = 1.0) -> str:
    """Three classes, 12 training and 6 test sequences each, of one-dimensional frames:
    ``level(class, split) + noise * N(0, 1)``."""
    rng = np.random.default_rng(0)
    store = FeatureStore.create(path, class_names=["a", "b", "c"])
    for c in range(3):
        for i in range(18):
            split = "train" if i < 12 else "test"
            t = int(rng.integers(8, 30))
            x = level(c, split) + noise * rng.normal(size=(t, 1))
            store.write_video(f"c{c}_{i:02d}", {"appearance": x}, label="abc"[c], split=split)
    return str(path)


def test_stcb_refuses_one_dimensional_streams(tmp_path: Path) -> None:
    store = _scalar_store(tmp_path / "s.zarr", lambda c, _: float(c))
    with pytest.raises(
        ValueError, match=r"head 'stcb' on one-dimensional streams \['appearance'\]"
    ):
        train_run(store, tmp_path / "run", head="stcb", **FAST)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_constant_streams_are_refused_by_name(tmp_path: Path, offset: float) -> None:
    """A stream that does not vary over the training videos (exactly, or by rounding only
    around a large value) stops every head before training, standardised or not."""
    store = _scalar_store(tmp_path / "c.zarr", lambda c, _: offset, noise=1e-6 * offset)
    for head, standardize in (("datp", True), ("gap", False)):
        with pytest.raises(ValueError, match="stream 'appearance' is constant over the 36"):
            train_run(store, tmp_path / head, head=head, standardize=standardize, **FAST)


def test_a_spread_of_rounding_size_is_constant() -> None:
    mean, std = torch.tensor([1000.0, 0.0, 1000.0]), torch.tensor([1e-3, 1e-3, 1.0])
    assert constant_features(mean, std).tolist() == [True, False, False]
    assert constant_features(torch.zeros(1), torch.full((1,), MIN_STD)).tolist() == [True]


def test_datp_learns_on_one_dimensional_inputs_and_says_what_it_sees(tmp_path: Path) -> None:
    """Classes whose one-dimensional sequences differ in level: datp's pooled feature (one
    weighted mean) separates them, and the run warns that it sees nothing else."""
    store = _scalar_store(tmp_path / "d.zarr", lambda c, _: 1.5 * c)
    metrics = train_run(store, tmp_path / "run", head="datp", steps=200, **FAST)
    assert metrics["top1"] >= 0.8
    assert any("'appearance' is one-dimensional: datp pools" in w for w in metrics["warnings"])


def test_a_run_at_chance_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The test split's classes take each other's levels: the head learns the training
    videos and scores at or below chance on the test videos; metrics.json and the console say
    so."""
    store = _scalar_store(tmp_path / "x.zarr", lambda c, s: 2.0 * (c if s == "train" else 2 - c))
    with caplog.at_level(logging.WARNING):
        metrics = train_run(store, tmp_path / "run", head="gap", steps=100, **FAST)
    assert metrics["top1"] <= 1 / 3
    warning = next(w for w in metrics["warnings"] if "at or below chance" in w)
    assert "33.3%, 3 classes" in warning
    assert warning in caplog.text
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert warning in written["warnings"]
