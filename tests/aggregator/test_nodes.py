"""Pyramid node bounds and means against a naive loop, in numpy and torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aggregator.intervals import (
    Intervals,
    batch_pool_intervals,
    interval_bounds,
    leaf_nodes,
    n_nodes,
    node_bounds,
    node_level_index,
    node_maxes,
    node_means,
)


def naive_nodes(x: np.ndarray, depth: int, reduce: str = "mean") -> np.ndarray:
    t = x.shape[0]
    out = []
    for level in range(1, depth + 1):
        parts = 2 ** (level - 1)
        for k in range(1, parts + 1):
            s = math.floor((k - 1) * t / parts)
            e = max(math.floor(k * t / parts), s + 1)
            s, e = min(s, t - 1), min(e, t)
            seg = x[s:e]
            out.append(seg.mean(0) if reduce == "mean" else seg.max(0))
    return np.stack(out)


@pytest.mark.parametrize("t", [1, 2, 3, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("depth", [1, 3, 6])
def test_node_means_match_naive(t: int, depth: int) -> None:
    x = np.random.default_rng(t * 7 + depth).standard_normal((t, 6))
    np.testing.assert_allclose(node_means(x, depth), naive_nodes(x, depth), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(node_maxes(x, depth), naive_nodes(x, depth, "max"), rtol=1e-6)
    b = node_bounds(t, depth)
    assert b.shape == (n_nodes(depth), 2)
    assert ((b[:, 1] - b[:, 0]) >= 1).all() and (b[:, 1] <= t).all()


def test_node_value_does_not_depend_on_depth() -> None:
    x = np.random.default_rng(0).standard_normal((17, 3))
    np.testing.assert_array_equal(node_means(x, 6)[:7], node_means(x, 3))


def test_node_order() -> None:
    assert [node_level_index(n) for n in range(7)] == [
        (1, 1),
        (2, 1),
        (2, 2),
        (3, 1),
        (3, 2),
        (3, 3),
        (3, 4),
    ]
    assert node_bounds(8, 3).tolist() == [[0, 8], [0, 4], [4, 8], [0, 2], [2, 4], [4, 6], [6, 8]]
    assert node_bounds(2, 3).tolist() == [  # T < 2^(D-1): every node still has a frame
        [0, 2],
        [0, 1],
        [1, 2],
        [0, 1],
        [0, 1],
        [1, 2],
        [1, 2],
    ]


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_leaf_nodes_are_the_last_level(depth: int) -> None:
    leaves = leaf_nodes(depth)
    assert leaves.stop - leaves.start == 1 << (depth - 1) and leaves.stop == n_nodes(depth)
    assert [node_level_index(n)[0] for n in range(leaves.start, leaves.stop)] == [depth] * (
        1 << (depth - 1)
    )
    np.testing.assert_array_equal(
        node_bounds(45, depth)[leaves], interval_bounds(45, (1 << (depth - 1),))
    )


def test_batch_matches_single_and_ignores_padding() -> None:
    rng = np.random.default_rng(1)
    lengths = [1, 3, 10, 7]
    depth = 4
    xs = [rng.standard_normal((t, 5)) for t in lengths]
    pad = np.full((len(xs), max(lengths), 5), 1e3)  # junk past lengths
    for i, x in enumerate(xs):
        pad[i, : len(x)] = x
    xt = torch.tensor(pad, dtype=torch.float64)
    lt = torch.tensor(lengths)
    means = batch_pool_intervals(xt, lt, Intervals.pyramid(depth))
    maxes = batch_pool_intervals(xt, lt, Intervals.pyramid(depth, "max"))
    for i, x in enumerate(xs):
        np.testing.assert_allclose(means[i].numpy(), naive_nodes(x, depth), rtol=1e-10)
        np.testing.assert_allclose(maxes[i].numpy(), naive_nodes(x, depth, "max"), rtol=1e-12)


def test_errors() -> None:
    with pytest.raises(ValueError, match="depth must be >= 1"):
        n_nodes(0)
    with pytest.raises(ValueError, match="at least one frame"):
        node_bounds(0, 2)
    with pytest.raises(ValueError, match="lengths"):
        batch_pool_intervals(torch.zeros(1, 3, 2), torch.tensor([0]), Intervals.pyramid(2))
