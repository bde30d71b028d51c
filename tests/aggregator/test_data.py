"""Training data: cached node summaries equal direct computation and follow the store; loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.data import (
    NodeTensors,
    frame_loader,
    label_indices,
    load_node_tensors,
    load_summaries,
    open_store,
    pad_collate,
    split_videos,
    stratified_holdout,
)
from aggregator.heads import HEADS, build_model
from aggregator.intervals import Intervals, PyramidLeaves, node_maxes, node_means, pool_intervals
from aggregator.node_cache import cache_key
from storage import FeatureStore
from tests.aggregator.reference import (
    one_thread,  # noqa: F401 - autouse fixture
    randomize,
)

LENGTHS = [1, 2, 5, 31, 32, 33, 70]


def make_store(path: Path) -> FeatureStore:
    rng = np.random.default_rng(0)
    store = FeatureStore.create(path, extractor={"appearance": {"backbone": "toy"}})
    for i, t in enumerate(LENGTHS):
        store.write_video(
            f"v{i}",
            {"appearance": rng.normal(size=(t, 6)), "motion": rng.normal(size=(t, 3))},
            label=f"class{i % 3}",
            split="train" if i % 2 else "test",
        )
    return store


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return make_store(tmp_path / "store.zarr")


def direct(store: FeatureStore, vid: str, stream: str) -> np.ndarray:
    return store.read(vid, stream)


def test_pyramid_nodes_come_from_the_node_cache_and_equal_direct_means(
    store: FeatureStore,
) -> None:
    ids = store.videos()
    got = load_summaries(store, ids, "appearance", Intervals.pyramid(6), progress=False)
    assert got.dtype == np.float16 and got.shape == (len(ids), 63, 6)
    for i, vid in enumerate(ids):
        want = node_means(direct(store, vid, "appearance"), 6).astype(np.float16)
        np.testing.assert_array_equal(got[i], want)
    # a level subset and a reordered subset of videos
    sub = load_summaries(store, ids[::-1][:3], "motion", Intervals((4,)), progress=False)
    for i, vid in enumerate(ids[::-1][:3]):
        want = node_means(direct(store, vid, "motion"), 3)[3:7].astype(np.float16)
        np.testing.assert_array_equal(sub[i], want)
    key, _ = cache_key(store, "appearance", 6, False)
    assert store.read_cache("nodes-appearance", key) is not None  # stored for the next run


def test_max_nodes_and_other_partitions(store: FeatureStore) -> None:
    ids = store.videos()
    maxes = load_summaries(store, ids, "appearance", Intervals.pyramid(3, "max"), progress=False)
    segs = load_summaries(store, ids, "appearance", Intervals((10,)), progress=False)
    paths = load_summaries(store, ids, "motion", Intervals((1, 3)), progress=False)
    for i, vid in enumerate(ids):
        x, xm = direct(store, vid, "appearance"), direct(store, vid, "motion")
        np.testing.assert_array_equal(maxes[i], node_maxes(x, 3).astype(np.float16))
        np.testing.assert_array_equal(
            segs[i], pool_intervals(x, Intervals((10,))).astype(np.float16)
        )
        np.testing.assert_array_equal(
            paths[i], pool_intervals(xm, Intervals((1, 3))).astype(np.float16)
        )


@pytest.mark.parametrize("spec", [Intervals.pyramid(6), Intervals((10,))])
def test_cache_is_reused_then_rebuilt_when_a_video_is_added(
    store: FeatureStore, spec: Intervals, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = store.videos()
    first = load_summaries(store, ids, "appearance", spec, progress=False)
    reopened = FeatureStore.open(store.path, "r+")

    def no_frames(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the cache should have been reused, not rebuilt from frames")

    with monkeypatch.context() as m:
        m.setattr(reopened, "read", no_frames)
        again = load_summaries(reopened, ids, "appearance", spec, progress=False)
    np.testing.assert_array_equal(again, first)

    rng = np.random.default_rng(9)
    new = rng.normal(size=(12, 6))
    reopened.write_video("v_new", {"appearance": new, "motion": new[:, :3]}, label="class0")
    ids2 = reopened.videos()
    assert "v_new" in ids2
    rebuilt = load_summaries(reopened, ids2, "appearance", spec, progress=False)
    k = ids2.index("v_new")
    want = pool_intervals(reopened.read("v_new", "appearance"), spec).astype(np.float16)
    np.testing.assert_array_equal(rebuilt[k], want)
    for vid in ids:  # the others are unchanged
        np.testing.assert_array_equal(rebuilt[ids2.index(vid)], first[ids.index(vid)])


def test_read_only_store_builds_in_memory(tmp_path: Path) -> None:
    make_store(tmp_path / "ro.zarr")
    ro = open_store(str(tmp_path / "ro.zarr"), writable=False)
    assert ro.mode == "r"
    got = load_summaries(ro, ro.videos(), "appearance", Intervals((1, 3)), progress=False)
    assert got.shape == (len(LENGTHS), 4, 6)
    assert not (tmp_path / "ro.zarr" / "cache").exists()  # nothing written


def test_node_tensors_and_batches(store: FeatureStore) -> None:
    ids = store.videos()
    y = label_indices(store, ids, store.class_names)
    specs = {"appearance": Intervals.pyramid(2), "motion": Intervals((3,))}
    data = load_node_tensors(store, ids, y, specs, progress=False)
    assert data.nodes["appearance"].shape == (len(ids), 3, 6)
    assert data.nodes["motion"].shape == (len(ids), 3, 3)
    assert data.nodes["appearance"].dtype == torch.float32
    seen = []
    gen = torch.Generator().manual_seed(0)
    for nodes, labels, rows in data.batches(np.arange(len(ids)), 3, shuffle=True, generator=gen):
        assert set(nodes) == {"appearance", "motion"} and len(labels) == len(rows) <= 3
        torch.testing.assert_close(nodes["motion"], data.nodes["motion"][rows])
        torch.testing.assert_close(labels, data.labels[rows])
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(ids)))


def test_labels_and_splits(store: FeatureStore) -> None:
    assert store.class_names == ["class0", "class1", "class2"]
    ids = split_videos(store, "train")
    np.testing.assert_array_equal(label_indices(store, ids, store.class_names), [1, 0, 2])
    with pytest.raises(ValueError, match="'class2'"):
        label_indices(store, ids, ["class0", "class1"])
    with pytest.raises(ValueError, match=r"its splits: test, train$"):
        split_videos(store, "val")


def test_stratified_holdout() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])
    train, val = stratified_holdout(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    counts = {c: int((labels[val] == c).sum()) for c in range(4)}
    assert counts == {0: 2, 1: 1, 2: 1, 3: 0}  # >= 1 per class that can spare one
    again = stratified_holdout(labels, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(stratified_holdout(labels, 0.2, seed=4)[1], val)
    assert len(stratified_holdout(labels, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1\.0"):
        stratified_holdout(labels, 1.0, seed=0)


def test_frame_loader_pads_and_masks(store: FeatureStore) -> None:
    ids = store.videos()
    loader = frame_loader(store, ids, ["appearance", "motion"], np.arange(len(ids)), batch_size=4)
    batches = list(loader)
    assert [len(b.video_ids) for b in batches] == [4, 3]
    for batch in batches:
        t_max = int(batch.lengths.max())
        assert batch.features["appearance"].shape == (len(batch.video_ids), t_max, 6)
        assert batch.features["motion"].shape == (len(batch.video_ids), t_max, 3)
        for i, vid in enumerate(batch.video_ids):
            n = int(batch.lengths[i])
            assert n == store.n_frames(vid, "appearance")
            assert batch.mask[i].sum() == n and batch.mask[i, :n].all()
            np.testing.assert_array_equal(
                batch.features["motion"][i, :n].numpy(), store.read(vid, "motion")
            )
            assert (batch.features["appearance"][i, n:] == 0).all()
            assert int(batch.labels[i]) == ids.index(vid)


def test_pad_collate_names_a_video_whose_streams_disagree() -> None:
    item = {"features": {"a": torch.ones(3, 2), "m": torch.ones(2, 2)}, "label": 0, "video_id": "v"}
    with pytest.raises(ValueError, match=r"'v': stream 'm' is \(2, 2\), expected \[3, 2\]"):
        pad_collate([item])
    with pytest.raises(ValueError, match="empty"):
        pad_collate([])


def test_pyramid_leaves_rebuild_the_cached_nodes(store: FeatureStore) -> None:
    ids = store.videos()
    y = np.zeros(len(ids), dtype=np.int64)
    spec = {"appearance": Intervals.pyramid(6)}
    full = load_node_tensors(store, ids, y, spec, progress=False)
    held = load_node_tensors(store, ids, y, spec, leaves=["appearance"], progress=False)
    assert held.nodes["appearance"].shape == (len(ids), 32, 6)  # half of the 63 nodes
    got = held.take(torch.arange(len(ids)))["appearance"]
    assert isinstance(got, PyramidLeaves)
    # exact up to the float16 rounding of the cached means
    torch.testing.assert_close(got.nodes(), full.nodes["appearance"], rtol=2e-3, atol=2e-3)


def test_windowed_batches_cover_every_row_once_without_copies() -> None:
    n, d = 23, 4
    nodes = {"appearance": torch.arange(n * 3 * d, dtype=torch.float32).view(n, 3, d)}
    data = NodeTensors([f"v{i}" for i in range(n)], nodes, torch.arange(n) % 5)
    gen = torch.Generator().manual_seed(0)
    groupings = []
    for _ in range(3):
        seen: list[int] = []
        batches = []
        for batch, labels, rows in data.batches(np.arange(2, n), 4, windows=True, generator=gen):
            x = batch["appearance"]
            assert isinstance(x, torch.Tensor)
            torch.testing.assert_close(x, nodes["appearance"][rows])
            torch.testing.assert_close(labels, data.labels[rows])
            assert 1 <= len(rows) <= 4
            if len(rows) == 4 and bool((rows.diff() == 1).all()):
                assert x.data_ptr() == nodes["appearance"][int(rows[0])].data_ptr()  # a view
            seen.extend(rows.tolist())
            batches.append(tuple(rows.tolist()))
        assert sorted(seen) == list(range(2, n))
        groupings.append(sorted(batches))
    assert len(set(map(tuple, groupings))) > 1  # the windows move between epochs
    with pytest.raises(ValueError, match="contiguous"):
        next(data.batches(np.array([0, 2, 3]), 2, windows=True))


# (head, head_kwargs, streams held as pyramid leaves): every head that reads frame vectors, with
# pyramid nodes, other partitions (interval cache), means and maxima, leaves and whole nodes
INPUT_PATHS = {
    "gap": ("gap", {}, ()),
    "max": ("max", {}, ()),
    "tp-concat": ("tp", {"depth": 6, "node_dim": 4}, ()),
    "tp-concat-leaves": ("tp", {"depth": 3, "node_dim": 4, "pyramids": 2}, ("appearance",)),
    "tp-average-leaves": ("tp", {"depth": 4, "variant": "average"}, ("appearance", "motion")),
    "tpp-max": ("tpp", {"levels": (1, 2, 4)}, ()),
    "tpp-average": ("tpp", {"levels": (1, 3), "pooling": "average"}, ()),
    "datp": ("datp", {"segments": 5, "gaussians": 2}, ()),
    "stcb": ("stcb", {"out_dim": 32, "paths": 3}, ()),
    "attn": ("attn", {"segments": 5, "queries": 2, "heads": 1}, ()),
}


def test_every_frame_head_has_an_input_path_case() -> None:
    assert {case[0] for case in INPUT_PATHS.values()} == set(HEADS) - {"stpn"}  # stpn: maps


@pytest.mark.parametrize("case", sorted(INPUT_PATHS))
def test_frames_input_path_equals_nodes_input_path(store: FeatureStore, case: str) -> None:
    """The same model on the same store: padded frames through ``forward`` give the logits that
    the cached summaries give through ``forward_nodes`` (up to the float16 rounding of the
    caches), for every video length in the store (T = 1 and 2 included)."""
    head, kwargs, leaves = INPUT_PATHS[case]
    streams = {"appearance": 6, "motion": 3}
    # fixed fusion sums the streams' logits (learned fusion would squash them into log p);
    # seeded, so that the initial weights do not depend on what ran before in this process
    torch.manual_seed(len(case))
    model = build_model(
        head, in_features=streams, num_classes=3, head_kwargs=kwargs, fusion="fixed"
    )
    randomize(model, seed=len(case)).eval()
    with torch.no_grad():  # logits of order 1 even where beta spreads over 63 nodes
        for name, p in model.named_parameters():
            if name.endswith("fc.weight"):
                p.mul_(1.0 / p.std())
    ids = store.videos()
    y = label_indices(store, ids, store.class_names)
    data = load_node_tensors(store, ids, y, model.input_specs, leaves=leaves, progress=False)
    assert sorted(data.mix) == sorted(leaves)
    by_frames = {}
    with torch.no_grad():
        nodes, _, rows = next(data.batches(np.arange(len(ids)), len(ids)))
        by_nodes = model.forward_nodes(nodes)
        for batch in frame_loader(store, ids, list(streams), y, batch_size=3):
            logits = model(batch.features, batch.lengths)
            by_frames.update(zip(batch.video_ids, logits, strict=True))
    want = torch.stack([by_frames[ids[int(r)]] for r in rows])
    assert by_nodes.shape == want.shape == (len(ids), 3)
    assert want.std() > 0.1  # the logits differ from video to video
    torch.testing.assert_close(by_nodes, want, rtol=2e-3, atol=2e-3)
