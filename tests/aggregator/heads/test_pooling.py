"""Equal-interval pooling: the node rule for any partition, padding masked, exact gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregator.intervals import (
    Intervals,
    batch_pool_intervals,
    interval_bounds,
    node_bounds,
    node_means,
    pool_intervals,
    pyramid_mix,
)
from tests.aggregator.reference import (
    naive_bounds,
    naive_pool,
    one_thread,  # noqa: F401 - autouse fixture
)


@pytest.mark.parametrize("t", [1, 2, 3, 5, 7, 31, 32, 33, 100])
def test_pyramid_parts_are_the_pyramid_nodes(t: int) -> None:
    spec = Intervals.pyramid(6)
    assert spec.parts == (1, 2, 4, 8, 16, 32)
    np.testing.assert_array_equal(interval_bounds(t, spec.parts), node_bounds(t, 6))
    assert spec.node_indices() == list(range(63))


@pytest.mark.parametrize("t", [1, 2, 9, 10, 11, 57])
@pytest.mark.parametrize("parts", [(10,), (1, 3), (1, 2, 4), (3, 5)])
def test_bounds_cover_every_part_with_at_least_one_frame(t: int, parts: tuple[int, ...]) -> None:
    bounds = interval_bounds(t, parts)
    assert [tuple(b) for b in bounds] == naive_bounds(t, parts)
    assert (bounds[:, 1] > bounds[:, 0]).all() and bounds.min() >= 0 and bounds.max() <= t


def test_node_indices_pick_pyramid_levels() -> None:
    assert Intervals((1, 2, 4)).node_indices() == list(range(7))
    assert Intervals((4,)).node_indices() == [3, 4, 5, 6]
    assert Intervals((1, 3)).node_indices() is None
    with pytest.raises(ValueError, match="parts"):
        Intervals((0,))
    with pytest.raises(ValueError, match="kind"):
        Intervals((1,), "median")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["mean", "max"])
@pytest.mark.parametrize("parts", [(1, 2, 4, 8), (10,), (1, 3)])
def test_batch_pooling_matches_naive_loops_with_junk_padding(
    kind: str, parts: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    lengths = [1, 3, 7, 20, 13]
    x = rng.normal(size=(len(lengths), 20, 6))
    junk = x.copy()
    for b, n in enumerate(lengths):
        junk[b, n:] = 1e6 * rng.normal(size=junk[b, n:].shape)
        if n < 20:
            junk[b, -1, 0] = np.nan
    spec = Intervals(parts, kind)  # type: ignore[arg-type]
    got = batch_pool_intervals(torch.from_numpy(junk), torch.tensor(lengths), spec).numpy()
    assert np.isfinite(got).all()
    for b, n in enumerate(lengths):
        want = naive_pool(x[b], n, parts, kind)
        np.testing.assert_allclose(got[b], want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(pool_intervals(x[b, :n], spec), want, rtol=1e-6, atol=1e-6)


def test_batch_means_agree_with_single_video_node_means() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(4, 40, 5)))
    lengths = torch.tensor([40, 1, 17, 31])
    got = batch_pool_intervals(x, lengths, Intervals.pyramid(6))
    for b in range(4):
        n = int(lengths[b])
        np.testing.assert_allclose(
            got[b].numpy(), node_means(x[b, :n].numpy(), 6), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("kind", ["mean", "max"])
def test_pooling_gradcheck_float64(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 9, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 2, 5])
    spec = Intervals((1, 2, 4), kind)  # type: ignore[arg-type]
    assert torch.autograd.gradcheck(lambda v: batch_pool_intervals(v, lengths, spec), (x,))


def test_padding_gets_no_gradient() -> None:
    x = torch.randn(2, 8, 3, requires_grad=True)
    lengths = torch.tensor([8, 3])
    batch_pool_intervals(x, lengths, Intervals((1, 2, 4))).sum().backward()
    assert x.grad is not None
    assert (x.grad[1, 3:] == 0).all() and (x.grad[1, :3] != 0).all()


def test_bad_lengths_are_rejected() -> None:
    x = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="at least one frame"):
        batch_pool_intervals(x, torch.tensor([5, 0]), Intervals((1,)))
    with pytest.raises(ValueError, match="exceed"):
        batch_pool_intervals(x, torch.tensor([6, 1]), Intervals((1,)))
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        batch_pool_intervals(x[0], torch.tensor([5]), Intervals((1,)))


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_pyramid_mix_rebuilds_every_node_from_the_leaves(depth: int) -> None:
    """nodes = mix @ leaves exactly, for T below, at and above the number of leaves."""
    rng = np.random.default_rng(depth)
    for t in [*range(1, 70), 127, 128, 129, 1000]:
        x = rng.normal(size=(t, 3))
        leaves = naive_pool(x, t, (1 << (depth - 1),), "mean")
        nodes = naive_pool(x, t, Intervals.pyramid(depth).parts, "mean")
        mix = pyramid_mix(t, depth)
        assert mix.shape == ((1 << depth) - 1, 1 << (depth - 1))
        np.testing.assert_allclose(mix.sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(mix @ leaves, nodes, rtol=1e-10, atol=1e-12, err_msg=f"T={t}")
    with pytest.raises(ValueError, match="n_frames"):
        pyramid_mix(0, depth)
