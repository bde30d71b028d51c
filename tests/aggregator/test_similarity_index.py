"""The similarity index is built block by block within its share of the memory budget."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

import aggregator.node_cache as nc
import aggregator.similarity as sim
from aggregator.run_loader import load_run
from aggregator.similarity import (
    SimilarityIndex,
    build_index,
    embed_store_videos,
    plan_index,
)
from aggregator.train import train_run
from storage import FeatureStore
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture
from tests.aggregator.toy_store import write_order_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("similarity")
    store = str(root / "s.zarr")
    write_order_store(store, n_train=16, n_test=2, d=8)  # 96 training videos
    run = root / "run"
    train_run(store, run, head="tp", head_kwargs={"depth": 6, "node_dim": 512}, epochs=1,
              batch_size=32, threads=1, device="cpu", make_plots=False, progress=False)  # fmt: skip
    return store, run


def test_block_wise_index_has_the_neighbours_of_the_whole_matrix(
    trained: tuple[str, Path], tmp_path: Path
) -> None:
    store_path, run = trained
    nc.forget_node_caches()
    out = tmp_path / "run"
    out.mkdir()
    index = build_index(out, store_path, "train", predictor=load_run(run), batch_size=5)
    assert index.meta["exact"] is True and index.meta["index"]["kind"] == "flat"
    store = FeatureStore.open(store_path, "r")
    ids = store.videos(split="train")
    whole = SimilarityIndex.from_embeddings(
        embed_store_videos(load_run(run), store, ids), ids, index.labels
    )
    assert index.video_ids == ids and len(index) == len(whole) == 96
    for vid in ids:
        a = index.search(index.vector(vid), 6, exclude=[vid])
        b = whole.search(whole.vector(vid), 6, exclude=[vid])
        assert [h.video_id for h in a] == [h.video_id for h in b]
        np.testing.assert_allclose([h.distance for h in a], [h.distance for h in b], atol=1e-5)
    loaded = SimilarityIndex.load(out)
    assert loaded.meta["exact"] is True and len(loaded) == 96
    assert loaded.kind()["kind"] == "flat" and loaded.kind()["bytes"] == 4 * 96 * index.dim + 45


def test_budget_path_never_holds_the_embedding_matrix(
    trained: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_path, run = trained
    predictor = load_run(run)
    # wide node projections, so that the matrix dwarfs the node data (pyramid mixes included)
    n, e = 96, 63 * 512
    matrix = 4 * n * e  # the float32 [n, e] matrix that must never exist (12 MiB)
    budget = 4700 << 10  # a 1.15 MiB share: an IVF-PQ
    added: list[int] = []
    real_empty = sim.empty_index

    def counting(plan: sim.IndexPlan, sample: Any) -> faiss.Index:
        index = real_empty(plan, sample)
        add = index.add

        def add_block(x: np.ndarray) -> None:
            added.append(len(x))
            add(x)

        setattr(index, "add", add_block)  # noqa: B010 - a swig method, counted
        return index

    monkeypatch.setattr(sim, "empty_index", counting)
    nc.forget_node_caches()
    out = tmp_path / "run"
    out.mkdir()
    tracemalloc.start()
    try:
        build_index(out, store_path, "train", predictor=predictor, batch_size=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    plan = plan_index(n, e, budget=nc.memory_budget())
    assert plan.exact  # the default budget holds this index exactly ...
    assert sum(added) == n and max(added) <= 8  # ... and it too was added block by block
    assert peak < matrix // 2  # numpy never held the matrix (nor a half of it)

    added.clear()
    small = tmp_path / "small"
    small.mkdir()
    tracemalloc.start()
    try:
        reduced = build_index(
            small, store_path, "train", predictor=predictor, budget=budget, batch_size=8
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    plan = plan_index(n, e, budget=budget)
    assert reduced.meta["exact"] is False and reduced.meta["index"]["kind"] == "ivfpq"
    assert len(reduced) == n and reduced.dim == e
    assert sum(added) == n and max(added) <= 8
    # the training samples may take TRAIN_MIN_BYTES (64 MiB), which here is every video
    assert peak < sim.TRAIN_MIN_BYTES
    assert reduced.meta["index_bytes"] <= plan.share  # the saved index fits its share
    loaded = SimilarityIndex.load(small)
    assert loaded.kind() == reduced.kind() and loaded.kind()["rerank_candidates"] >= 1
    # the full vectors beside the compressed index, read through a memory map for re-ranking
    assert loaded.vectors is not None and loaded.vectors.shape == (n, e)
    full = loaded.vectors.read(np.arange(n))
    for i in (0, 40, 95):
        q = full[i] / np.linalg.norm(full[i])
        hits = loaded.search(q, 5, exclude=[loaded.video_ids[i]])
        exact = [1.0 - float(full[loaded.video_ids.index(h.video_id)] @ q) for h in hits]
        np.testing.assert_allclose([h.distance for h in hits], np.clip(exact, 0, 2), atol=1e-5)
        assert exact == sorted(exact)  # in their exact order
    (small / "index_vectors.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"index_vectors\.npy"):
        SimilarityIndex.load(small)
