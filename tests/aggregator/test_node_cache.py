"""The out-of-core node cache: block reads equal the in-memory cache and direct node means,
streamed training batches equal the in-memory ones (same logits), one load per process, object
storage, damage detection."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import aggregator.node_cache as nc
from aggregator.data import NodeTensors, load_node_data, load_node_tensors
from aggregator.evaluate import evaluate_run
from aggregator.heads import build_model
from aggregator.inference import predict_nodes
from aggregator.intervals import Intervals, PyramidLeaves, node_means
from aggregator.run_data import standardization_stats
from aggregator.similarity import build_index
from aggregator.train import train_run
from aggregator.train_loop import validation_score
from storage import FeatureStore
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture
from tests.aggregator.toy_store import write_order_store


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # blocks of a few videos, so that tiny stores span many blocks
    monkeypatch.setattr(nc, "CHUNK_BYTES", 2 * 10 * 5)
    nc.forget_node_caches()


def toy(path: str, **kw: object) -> FeatureStore:
    write_order_store(path, n_train=5, n_test=3, d=10, **kw)  # type: ignore[arg-type]
    return FeatureStore.open(path, "r+")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_out_of_core_cache_equals_in_memory_and_direct_means(tmp_path: Path, where: str) -> None:
    path = str(tmp_path / "s.zarr") if where == "local" else f"memory://nc-{uuid.uuid4().hex}"
    store = toy(path)
    lazy = nc.load_node_cache(store, "appearance", budget=0, progress=False)
    assert not lazy.in_memory and lazy.rows_per_block == 5 and len(lazy) == 48
    nc.forget_node_caches()
    whole = nc.load_node_cache(FeatureStore.open(path, "r"), "appearance", progress=False)
    assert whole.in_memory  # stored by the first load, read back whole this time
    ids = store.videos()
    for i in (0, 7, 47):
        want = node_means(store.read(ids[i], "appearance"), 6).astype(np.float16)
        np.testing.assert_array_equal(whole.means[i], want)
    rows = np.array([40, 3, 4, 17, 3, 0])
    for nodes in (slice(0, 63), slice(31, 63), slice(1, 3)):
        np.testing.assert_array_equal(lazy.gather(rows, nodes), whole.means[rows, nodes])
    blocks = [b for _, b in lazy.iter_blocks(slice(31, 63))]
    assert [len(b) for b in blocks] == [5] * 9 + [3]
    np.testing.assert_array_equal(np.concatenate(blocks), whole.means[:, 31:63])
    np.testing.assert_array_equal(lazy.take(ids[:4], 3), whole.means[:4, :7].astype(np.float32))


def test_loaded_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = toy(str(tmp_path / "s.zarr"))
    first = nc.load_node_cache(store, "appearance", progress=False)

    def no_reads(*args: object, **kw: object) -> None:
        raise AssertionError("the node cache was read again")

    monkeypatch.setattr(FeatureStore, "read_cache", no_reads)
    again = nc.load_node_cache(FeatureStore.open(store.path, "r"), "appearance", progress=False)
    assert again is first
    store.write_video("new", {"appearance": np.ones((6, 10))}, label="order0", split="train")
    monkeypatch.undo()
    assert nc.load_node_cache(store, "appearance", progress=False) is not first  # new content


def _leaf_data(store: FeatureStore, budget: int) -> tuple[NodeTensors | nc.NodeBlocks, list]:
    ids = store.videos()
    names = store.class_names
    labels = np.array([names.index(x) for x in store.labels(ids)])
    specs = {"appearance": Intervals.pyramid(3), "motion": Intervals.pyramid(3)}
    data = load_node_data(
        store, ids, labels, specs, leaves=["appearance"], budget=budget, progress=False
    )
    return data, ids


@pytest.mark.parametrize("budget", [0, 28_800])  # groups of one batch; of 10 rows (carries)
def test_streamed_batches_give_the_same_logits(tmp_path: Path, budget: int) -> None:
    store = toy(str(tmp_path / "s.zarr"), streams=("appearance", "motion"))
    blocks, ids = _leaf_data(store, budget=budget)
    memory, _ = _leaf_data(store, budget=1 << 30)
    assert isinstance(blocks, nc.NodeBlocks) and isinstance(memory, NodeTensors)
    assert blocks.group_rows == (1 if budget == 0 else 10)
    assert sorted(blocks.mix) == sorted(memory.mix) == ["appearance"]
    model = build_model(
        "tp",
        in_features={"appearance": 10, "motion": 12},
        num_classes=6,
        head_kwargs={"depth": 3},
    )
    model.train(False)
    # rows in store order: the same batches, the same logits to the bit
    rows = np.array([0, 1, 2, 3, 9, 30, 31, 40, 47])
    got, got_s = predict_nodes(model, blocks, rows, batch_size=4, per_stream=True)
    want, want_s = predict_nodes(model, memory, rows, batch_size=4, per_stream=True)
    np.testing.assert_array_equal(got, want)
    for s in want_s:
        np.testing.assert_array_equal(got_s[s], want_s[s])
    # any order: streamed rows are scored in store order and put back; batches of other rows
    # may round the last bit differently
    rows = np.array([3, 1, 40, 2, 9, 47, 0, 30, 31])
    got, got_s = predict_nodes(model, blocks, rows, batch_size=4, per_stream=True)
    want, want_s = predict_nodes(model, memory, rows, batch_size=4, per_stream=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for s in want_s:
        np.testing.assert_allclose(got_s[s], want_s[s], rtol=1e-6, atol=1e-6)
    # ordered batches hold the same rows and values as the in-memory ones
    for (a, ya, ra), (b, yb, rb) in zip(
        blocks.batches(rows, 4), memory.batches(rows, 4), strict=True
    ):
        assert torch.equal(ra, rb) and torch.equal(ya, yb)
        la, lb = a["appearance"], b["appearance"]
        assert isinstance(la, PyramidLeaves) and isinstance(lb, PyramidLeaves)
        assert torch.equal(la.leaves, lb.leaves) and torch.equal(la.mix, lb.mix)
        assert torch.equal(a["motion"], b["motion"])
    # shuffled: every row exactly once per epoch, batches full but the last, labels follow rows
    gen = torch.Generator().manual_seed(0)
    seen = []
    for nodes, y, r in blocks.batches(np.arange(len(ids)), 7, windows=True, generator=gen):
        seen.extend(r.tolist())
        assert torch.equal(y, memory.labels[r])
        want_rows = memory.take(r)
        assert torch.equal(nodes["motion"], want_rows["motion"])
    assert sorted(seen) == list(range(len(ids))) and seen != list(range(len(ids)))


def test_a_shuffled_epoch_reads_each_block_once(tmp_path: Path) -> None:
    store = toy(str(tmp_path / "s.zarr"), streams=("appearance", "motion"))
    # 360 bytes a row: an eighth of 8,000 holds 2 rows, less than a block of 5, but two blocks
    # fit half the budget, so a group is a whole block
    blocks, ids = _leaf_data(store, budget=8_000)
    assert isinstance(blocks, nc.NodeBlocks) and blocks.group_rows == 5
    cache = blocks.caches["appearance"]
    assert cache.rows_per_block == 5
    read = cache.read
    starts: list[int] = []

    def counted(start: int, stop: int, nodes: slice, kind: str = "mean") -> np.ndarray:
        starts.append(start)
        assert stop - start <= 5 and start // 5 == (stop - 1) // 5  # within one block
        return read(start, stop, nodes, kind)

    cache.read = counted  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(1)
    seen = [r for _, _, rows in blocks.batches(np.arange(len(ids)), 3, windows=True,
                                               generator=gen) for r in rows.tolist()]  # fmt: skip
    assert sorted(seen) == list(range(len(ids)))
    assert sorted(s // 5 for s in starts) == list(range(10))  # 48 rows: 10 blocks, once each
    # a budget below two blocks keeps the eighth: groups stay pieces of a block
    small, _ = _leaf_data(store, budget=2_000)
    assert isinstance(small, nc.NodeBlocks) and small.group_rows == 1


def test_order_free_passes_read_each_block_once(tmp_path: Path) -> None:
    """Standardisation statistics and scoring of rows in a random order (the trainer's
    validation rows) read in store order: each block once, the same results as in memory."""
    store = toy(str(tmp_path / "s.zarr"), streams=("appearance", "motion"))
    blocks, ids = _leaf_data(store, budget=8_000)  # a group is one block of 5 rows
    assert isinstance(blocks, nc.NodeBlocks)
    cache = blocks.caches["appearance"]
    read = cache.read
    starts: list[int] = []

    def counted(start: int, stop: int, nodes: slice, kind: str = "mean") -> np.ndarray:
        starts.append(start)
        return read(start, stop, nodes, kind)

    cache.read = counted  # type: ignore[method-assign]
    rows = np.random.default_rng(0).permutation(len(ids))[:40]
    touched = sorted({int(r) // 5 for r in cache.rows([ids[i] for i in rows])})
    got_stats = standardization_stats(blocks, rows, chunk=3)
    assert sorted(s // 5 for s in starts) == touched  # each block once
    torch.manual_seed(0)  # the same weights whichever tests ran before
    model = build_model(
        "tp",
        in_features={"appearance": 10, "motion": 12},
        num_classes=6,
        head_kwargs={"depth": 3},
    )
    model.train(False)
    starts.clear()
    got, _ = predict_nodes(model, blocks, rows, batch_size=3)
    assert sorted(s // 5 for s in starts) == touched
    # the same rows read in their random order: most blocks once for every group
    starts.clear()
    for _ in blocks.batches(rows, 3):
        pass
    assert len(starts) > 2 * len(touched)

    nc.forget_node_caches()  # the in-memory data from a fresh load
    memory, _ = _leaf_data(store, budget=1 << 30)
    assert isinstance(memory, NodeTensors)
    want_stats = standardization_stats(memory, rows, chunk=3)
    for s, (mean, std) in want_stats.items():
        torch.testing.assert_close(got_stats[s][0], mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_stats[s][1], std, rtol=1e-6, atol=1e-6)
    want, _ = predict_nodes(model, memory, rows, batch_size=3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    labels = memory.labels[rows].numpy()
    assert validation_score(got, labels) == validation_score(want, labels)


def test_memory_budget_option_of_train(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from api.cli import main

    caplog.set_level(logging.INFO, logger="aggregator.data")
    path = str(tmp_path / "s.zarr")
    write_order_store(path, n_train=6, n_test=3, d=8)
    monkeypatch.setenv(nc.BUDGET_ENV, "1G")  # the option wins over the environment
    args = ["train", "--store", path, "--head", "tp", "--levels", "3", "--epochs", "1", "--device",
            "cpu", "--no-plots", "--no-index", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main([*args, "--memory-budget", "1K"]) == 0
    assert "streaming row blocks" in caplog.text
    assert nc.memory_budget() == 1024
    assert main([*args, "--memory-budget", "lots"]) == 2
    assert "--memory-budget" in capsys.readouterr().err


def test_out_of_core_training_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aggregator.data")
    path = str(tmp_path / "s.zarr")
    write_order_store(path, n_train=12, n_test=6, d=8)
    monkeypatch.setenv(nc.BUDGET_ENV, "1K")  # far below the node data: streams row blocks
    out = tmp_path / "run"
    metrics = train_run(
        path,
        out,
        head="tp",
        head_kwargs={"depth": 3},
        epochs=30,
        batch_size=16,
        threads=1,
        device="cpu",
        make_plots=False,
        progress=False,
    )
    assert "streaming row blocks" in caplog.text
    assert metrics["top1"] > 0.5  # the temporal order is learned from streamed blocks
    assert metrics["pyramid_leaves"] == ["appearance"]
    # the test logits computed from streamed blocks are what the in-memory path reproduces
    monkeypatch.setenv(nc.BUDGET_ENV, "1G")
    nc.forget_node_caches()
    again = evaluate_run(out, path, write=False)
    assert again["top1"] == metrics["top1"]
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    index = build_index(out, path, split="train")
    assert len(index) == 72
    assert json.loads((out / "index_ids.json").read_text())["split"] == "train"


def test_damaged_video_stops_the_cache_build(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = toy(str(path))
    (path / "videos" / "c2_v001" / "appearance" / "c" / "0" / "0").unlink()
    with pytest.raises(ValueError, match=r"c2_v001.*c/0/0.*missing"):
        nc.load_node_cache(store, "appearance", progress=False)


def test_damaged_cache_chunk_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = toy(str(path))
    nc.load_node_cache(store, "appearance", budget=0, progress=False)
    chunk = next((path / "cache").glob("nodes-appearance/*/means/c/1/5/0"))
    chunk.unlink()
    nc.forget_node_caches()
    lazy = nc.load_node_cache(store, "appearance", budget=0, progress=False)
    lazy.read(0, 5, slice(0, 3))  # blocks without the lost chunk still read
    with pytest.raises(ValueError, match="node cache is damaged"):
        lazy.read(5, 10, slice(0, 63))
    ids = store.videos()
    data = load_node_tensors  # the in-memory path reads it whole and fails the same way
    with pytest.raises(ValueError, match="node cache is damaged"):
        nc.forget_node_caches()
        data(store, ids, np.zeros(len(ids)), {"appearance": Intervals.pyramid(6)}, progress=False)
