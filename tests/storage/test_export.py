"""Export to per-video NumPy files and to_numpy, checked against store.read on real clips."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from aggregator.intervals import node_means
from api.cli import main
from extractor.pipeline import run_extract
from extractor.spec import BackboneSpec
from storage import FeatureStore
from storage.export import export_filename, export_store, pyramid_node_means, to_numpy

CLIPS = ("mm_part_0.mp4", "vf_v_GGSY1Qvo990.mp4", "mm_test.avi", "mm_demo.mp4")


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory, real_videos: list[Path]) -> Path:
    d = tmp_path_factory.mktemp("export")
    by_name = {p.name: p for p in real_videos}
    labels = d / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, name in enumerate(CLIPS):
            w.writerow([str(by_name[name]), f"class{i % 2}", "test" if i == 3 else "train"])
    store = d / "store.zarr"
    summary = run_extract(
        [by_name[n] for n in CLIPS],
        store,
        BackboneSpec(weights="random", arch="resnet18", dtype="float32"),
        labels=labels,
        device="cpu",
        max_frames=5,
        workers=1,
        progress=False,
    )
    assert summary.ok, summary.format()
    return store


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_export_round_trips_against_read(real_store: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "features"
    assert main(["store", "export", str(real_store), "--format", fmt, "--out", str(out)]) == 0
    store = FeatureStore.open(real_store)
    vids = store.videos()
    assert len(vids) == len(CLIPS)
    names = ("appearance", "motion")
    if fmt == "npy":  # and each stream's row times beside it
        names += ("appearance_times", "motion_times")
    expected = {export_filename(v, s, fmt) for v in vids for s in names}
    assert {p.name for p in out.iterdir()} == expected  # no partial files left
    for vid in vids:
        for stream in ("appearance", "motion"):
            path = out / export_filename(vid, stream, fmt)
            got = np.load(path) if fmt == "npy" else np.load(path)[stream]
            want = store.read(vid, stream)
            assert got.dtype == np.float32 and got.shape == want.shape == (5, 512)
            np.testing.assert_array_equal(got, want)
            times = (
                np.load(out / export_filename(vid, f"{stream}_times", fmt))
                if fmt == "npy"
                else np.load(path)["times"]
            )
            recorded = store.times(vid, stream)
            assert not recorded.derived and times.dtype == np.float64
            np.testing.assert_array_equal(times, recorded.seconds)


def test_export_of_one_split_and_one_stream(real_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "test-only"
    args = ["store", "export", str(real_store), "--out", str(out), "--split", "test"]
    assert main([*args, "--streams", "motion"]) == 0
    store = FeatureStore.open(real_store)
    (vid,) = store.videos(split="test")
    assert sorted(p.name for p in out.iterdir()) == [f"{vid}_motion.npy", f"{vid}_motion_times.npy"]
    assert main([*args[:-1], "nope"]) == 2  # an empty split is a usage error
    summary = export_store(store, tmp_path / "api", fmt="npz", split="test")
    assert summary.n_videos == 1 and len(summary.files) == 2


def test_to_numpy_mean_and_nodes(real_store: Path) -> None:
    store = FeatureStore.open(real_store)
    X, y, ids = to_numpy(store, "train", "appearance")
    assert ids == store.videos(split="train") and len(ids) == 3
    assert X.shape == (3, 512) and X.dtype == np.float32
    assert list(y) == store.labels(ids)
    for row, vid in zip(X, ids, strict=True):
        np.testing.assert_allclose(row, store.read(vid, "appearance").mean(axis=0), rtol=1e-6)
    Xn, _, _ = to_numpy(store, "train", "motion", pooling="nodes", levels=3)
    assert Xn.shape == (3, 7 * 512)
    for row, vid in zip(Xn, ids, strict=True):
        want = node_means(store.read(vid, "motion"), 3).reshape(-1)
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'max'"):
        to_numpy(store, "train", "motion", pooling="max")


def test_pyramid_node_means_match_the_heads_rule_for_short_videos() -> None:
    rng = np.random.default_rng(0)
    for t in (1, 2, 3, 5, 17):
        x = rng.standard_normal((t, 4)).astype(np.float32)
        np.testing.assert_allclose(pyramid_node_means(x, 4), node_means(x, 4), rtol=1e-6)
