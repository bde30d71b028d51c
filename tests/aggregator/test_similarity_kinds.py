"""The similar-video index's kind follows the memory budget; compressed kinds find neighbours."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from aggregator.faiss_index import PQ_DSUB, ivfpq_plan
from aggregator.rerank import open_vectors, write_vectors
from aggregator.similarity import INDEX_SHARE, SimilarityIndex, index_matrix, normalize, plan_index


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # small sets: a second thread only adds synchronisation
    yield
    faiss.omp_set_num_threads(before)


def _clustered(n: int, e: int, seed: int = 0) -> np.ndarray:
    """Unit rows around 20 centres of a 12-dimensional subspace, with a little full-rank noise."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((20, 12))
    z = centres[rng.integers(0, 20, n)] + rng.standard_normal((n, 12))
    return normalize(z @ rng.standard_normal((12, e)) + 0.02 * rng.standard_normal((n, e)))


def _recall(index: faiss.Index, x: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    truth = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]
    _, got = index.search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth, strict=True)]))


def test_kind_follows_the_budget() -> None:
    n, e = 3000, 256
    flat = plan_index(n, e, INDEX_SHARE * 4 * n * e)
    assert flat.kind == "flat" and flat.exact and flat.nbytes == 4 * n * e
    hnsw = plan_index(n, e, INDEX_SHARE * 3 * n * e)  # a byte a dimension and the graph fit
    assert hnsw.kind == "hnsw" and hnsw.factory == "HNSW32,SQ8" and hnsw.nbytes <= hnsw.share
    assert hnsw.params["efSearch"] >= 64 and 0 < hnsw.sample <= n
    for budget in (INDEX_SHARE * n * e // 2, INDEX_SHARE * n * e // 8):
        pq = plan_index(n, e, budget)
        assert pq.kind == "ivfpq" and pq.factory.startswith("IVF") and pq.nbytes <= pq.share
        assert pq.params["nprobe"] <= pq.params["nlist"]
    # fewer bytes, fewer codes: the plan spends what the budget gives
    big, small = (
        plan_index(n, e, INDEX_SHARE * n * e // 2),
        plan_index(n, e, INDEX_SHARE * n * e // 8),
    )
    assert big.params["m"] * big.params["nbits"] > small.params["m"] * small.params["nbits"]
    # 240,000 tp concat embeddings (63 x 128) at --memory-budget 128M: rotated, then IVF-PQ
    k400 = plan_index(240_000, 8064, 128 << 20)
    assert k400.kind == "ivfpq" and k400.nbytes <= k400.share == 32 << 20
    assert k400.params["rotated_dim"] == PQ_DSUB * k400.params["m"] and k400.params["nbits"] == 8
    assert 4 * k400.sample * 8064 * 5 // 4 <= 64 << 20  # the rotation's sample fits half the budget
    assert plan_index(100_000, 8064, 6 << 30).kind == "hnsw"
    at_default = plan_index(240_000, 8064, 6 << 30)
    assert at_default.kind == "ivfpq" and at_default.params["m"] == 256  # at most 256 codebooks
    assert at_default.params["rotated_dim"] == PQ_DSUB * 256
    with pytest.raises(ValueError, match="n=0"):
        plan_index(0, 4)


def test_an_ivfpq_of_another_code_shape_fits_the_same_share() -> None:
    n, e, share, train = 240_000, 8064, 32 << 20, 64 << 20
    planned = ivfpq_plan(n, e, share, train)
    wide = ivfpq_plan(n, e, share, train, dsub=4)
    narrow = ivfpq_plan(n, e, share, train, dsub=2, probe_share=1)
    assert planned is not None and wide is not None and narrow is not None
    assert planned == plan_index(n, e, 128 << 20)
    assert wide.params["rotated_dim"] == 4 * wide.params["m"]
    assert narrow.params["rotated_dim"] == 2 * narrow.params["m"]
    assert narrow.params["nprobe"] == narrow.params["nlist"]  # every list probed
    # half the rotated dimensions a code: a smaller rotation leaves bytes for more codes
    assert wide.params["m"] < narrow.params["m"] and narrow.nbytes <= share


@pytest.mark.parametrize(
    ("kind", "n", "e", "bytes_per_dim", "least"),
    [
        ("hnsw", 3000, 256, 3.0, 0.9),
        # codebook training is the slow part of a small IVF-PQ on a shared CPU
        pytest.param("ivfpq", 1500, 128, 1.0, 0.85, marks=pytest.mark.slow),
    ],
)
def test_compressed_index_recall_against_exact_search(
    kind: str, n: int, e: int, bytes_per_dim: float, least: float
) -> None:
    x = _clustered(n, e)
    index, plan = index_matrix(x, INDEX_SHARE * int(bytes_per_dim * n * e))
    assert plan.kind == kind
    assert len(faiss.serialize_index(index)) <= plan.share  # measured, not only planned
    assert _recall(index, x, x[::30]) >= least


def _groups(n_groups: int = 60, size: int = 5, e: int = 64) -> tuple[np.ndarray, list[str]]:
    """``size`` near copies of each of ``n_groups`` random directions."""
    rng = np.random.default_rng(1)
    anchors = normalize(rng.standard_normal((n_groups, e)))
    x = np.repeat(anchors, size, axis=0) + 0.02 * rng.standard_normal((n_groups * size, e))
    ids = [f"g{g:02d}m{m}" for g in range(n_groups) for m in range(size)]
    return normalize(x), ids


def _ivfpq(x: np.ndarray, ids: list[str]) -> SimilarityIndex:
    index, plan = index_matrix(x, INDEX_SHARE * x.shape[0] * x.shape[1] * 2)  # half of flat
    assert plan.kind == "ivfpq"
    labels: list[str | None] = [v[:3] for v in ids]
    return SimilarityIndex(index, ids, labels, {"index": plan.record()})


def test_compressed_search_returns_the_constructed_neighbours() -> None:
    x, ids = _groups()
    index = _ivfpq(x, ids)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index.index))
    assert not ivf.do_polysemous_training and ivf.polysemous_ht == 0  # no Hamming filter to train
    for i in range(0, len(ids), 7):
        hits = index.search(x[i], 4, exclude=[ids[i]])
        assert {h.video_id[:3] for h in hits} == {ids[i][:3]}  # its four siblings
        assert all(h.distance < 0.1 for h in hits)


def test_saved_compressed_index_reloads(tmp_path: Path) -> None:
    x, ids = _groups()
    index = _ivfpq(x, ids)
    index.save(tmp_path)
    loaded = SimilarityIndex.load(tmp_path)
    kind = loaded.kind()
    assert kind["kind"] == "ivfpq" and kind["factory"] == index.meta["index"]["factory"]
    assert kind["params"] == index.meta["index"]["params"]
    assert kind["bytes"] == (tmp_path / "index.faiss").stat().st_size
    nprobe = index.meta["index"]["params"]["nprobe"]
    assert faiss.extract_index_ivf(loaded.index).nprobe == nprobe
    for i in (0, 101, 299):
        a = index.search(x[i], 6, exclude=[ids[i]])
        b = loaded.search(x[i], 6, exclude=[ids[i]])
        assert [h.video_id for h in a] == [h.video_id for h in b]
        v = loaded.vector(ids[i])  # the decoded code: close to the video's embedding
        assert float(v @ x[i]) / float(np.linalg.norm(v)) > 0.9


def test_reranking_from_the_full_vectors_recovers_what_the_codes_miss(tmp_path: Path) -> None:
    x = _clustered(3000, 256, seed=3)
    queries, x = x[:100], x[100:]
    n, e = x.shape
    index, plan = index_matrix(x, INDEX_SHARE * n * e // 16)  # 2 bits a dimension
    assert plan.kind == "ivfpq"
    ids = [f"v{i}" for i in range(n)]
    truth = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :10]
    codes_only = _recall(index, x, queries)
    path = write_vectors(tmp_path / "vectors.npy", [x[:1000], x[1000:]], n, e)
    reranked = SimilarityIndex(index, ids, [None] * n, vectors=open_vectors(path, n, e))
    found = [[int(h.video_id[1:]) for h in reranked.search(q, 10)] for q in queries]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
    assert recall >= max(codes_only, 0.95), (codes_only, recall)
