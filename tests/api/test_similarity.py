"""The faiss similarity index against a naive cosine search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.similarity import IDS_FILE, INDEX_FILE, SimilarityIndex, has_index, normalize


def naive_neighbours(x: np.ndarray, q: np.ndarray, k: int) -> list[tuple[int, float]]:
    out = []
    for i, row in enumerate(x):
        cos = float(row @ q / (np.linalg.norm(row) * np.linalg.norm(q)))
        out.append((i, 1.0 - cos))
    out.sort(key=lambda t: (t[1], t[0]))
    return out[:k]


@pytest.fixture
def data() -> tuple[np.ndarray, list[str], list[str | None]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)).astype(np.float32)
    ids = [f"v{i:02d}" for i in range(40)]
    labels: list[str | None] = [f"c{i % 3}" for i in range(40)]
    labels[5] = None
    return x, ids, labels


def test_search_matches_naive_cosine(data) -> None:
    x, ids, labels = data
    index = SimilarityIndex.from_embeddings(x, ids, labels)
    rng = np.random.default_rng(1)
    for _ in range(5):
        q = rng.normal(size=12).astype(np.float32)
        hits = index.search(q, 7)
        ref = naive_neighbours(x.astype(np.float64), q.astype(np.float64), 7)
        assert [h.video_id for h in hits] == [ids[i] for i, _ in ref]
        np.testing.assert_allclose([h.distance for h in hits], [d for _, d in ref], atol=1e-5)
        assert [h.label for h in hits] == [labels[i] for i, _ in ref]


def test_self_is_nearest_and_scale_does_not_matter(data) -> None:
    x, ids, labels = data
    index = SimilarityIndex.from_embeddings(x * 7.5, ids, labels)
    for i in (0, 5, 39):
        hits = index.search(x[i] * 0.01, 3)
        assert hits[0].video_id == ids[i]
        assert hits[0].distance == pytest.approx(0.0, abs=1e-5)
        assert hits[1].distance >= hits[0].distance
    # the opposite direction is the farthest, at distance 2
    farthest = index.search(-x[3], 40)[-1]
    assert farthest.video_id == ids[3]
    assert farthest.distance == pytest.approx(2.0, abs=1e-5)


def test_exclude_and_vector(data) -> None:
    x, ids, labels = data
    index = SimilarityIndex.from_embeddings(x, ids, labels)
    v = index.vector("v07")
    np.testing.assert_allclose(v, normalize(x[7]), atol=1e-6)
    hits = index.search(v, 4, exclude=["v07"])
    assert len(hits) == 4 and "v07" not in [h.video_id for h in hits]
    ref = naive_neighbours(x.astype(np.float64), x[7].astype(np.float64), 5)[1:]
    assert [h.video_id for h in hits] == [ids[i] for i, _ in ref]
    assert len(index.search(v, 100)) == 40  # k beyond n: every video once
    with pytest.raises(KeyError, match="v99"):
        index.vector("v99")


def test_save_load_round_trip(tmp_path: Path, data) -> None:
    x, ids, labels = data
    index = SimilarityIndex.from_embeddings(x, ids, labels, {"split": "train", "run_id": "r1"})
    assert not has_index(tmp_path)
    index.save(tmp_path)
    assert has_index(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_FILE, IDS_FILE])
    meta = json.loads((tmp_path / IDS_FILE).read_text())
    assert meta["video_ids"] == ids and meta["metric"] == "cosine" and meta["split"] == "train"
    loaded = SimilarityIndex.load(tmp_path)
    q = x[11] + 0.1
    assert loaded.search(q, 5) == index.search(q, 5)
    assert loaded.meta["run_id"] == "r1" and loaded.dim == 12 and len(loaded) == 40


def test_bad_inputs(tmp_path: Path, data) -> None:
    x, ids, labels = data
    index = SimilarityIndex.from_embeddings(x, ids, labels)
    with pytest.raises(ValueError, match="dimension 5"):
        index.search(np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="k must be"):
        index.search(x[0], 0)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(12, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="unique"):
        SimilarityIndex.from_embeddings(x[:2], ["a", "a"], [None, None])
    with pytest.raises(ValueError, match="2 video ids"):
        SimilarityIndex.from_embeddings(x[:3], ["a", "b"], [None, None])
    with pytest.raises(FileNotFoundError, match=r"index\.faiss"):
        SimilarityIndex.load(tmp_path)
    # a zero embedding is allowed and is equally far (distance 1) from everything
    hits = index.search(np.zeros(12, dtype=np.float32), 3)
    assert all(h.distance == pytest.approx(1.0) for h in hits)


@pytest.mark.parametrize("head", ["gap", "tp"])
def test_cached_embeddings_equal_per_video_embeddings(served, head: str) -> None:
    from aggregator.run_loader import load_run
    from aggregator.similarity import embed_store_videos
    from storage import FeatureStore

    run = load_run(getattr(served, head))
    store = FeatureStore.open(served.store, "r")
    ids = store.videos(split="train")
    fast = embed_store_videos(run, store, ids)
    slow = embed_store_videos(run, store, ids, use_cache=False)
    assert fast.shape == slow.shape and fast.shape[0] == len(ids)
    # the cache holds float16 node summaries; the slow path pools float32 frames
    np.testing.assert_allclose(fast, slow, rtol=2e-2, atol=2e-2 * np.abs(slow).max())
    cos = (normalize(fast) * normalize(slow)).sum(1)
    assert cos.min() > 0.9999
