"""FeatureStore: round trip, atomic completion, failures, splits, local paths and memory:// URLs."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from storage import FeatureStore, assign_video_ids, safe_video_id


@pytest.fixture(params=["local", "memory"])
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "features.zarr")
    return f"memory://framepool-{uuid.uuid4().hex}"


def test_round_trip_any_dims_and_streams(store_path: str) -> None:
    rng = np.random.default_rng(0)
    store = FeatureStore.create(store_path, extractor={"appearance": {"backbone": "resnet101"}})
    a = rng.standard_normal((7, 2048)).astype(np.float32)
    m = rng.standard_normal((7, 5)).astype(np.float32)
    store.write_video(
        "v1",
        {"appearance": a, "motion": m},
        label="jump",
        split="train",
        meta={"n_frames": 7, "fps": 25.0},
    )
    store.write_video("v2", {"appearance": a[:1]}, label="run", split="test")

    ro = FeatureStore.open(store_path, "r")
    assert ro.videos() == ["v1", "v2"]
    assert ro.videos(split="train") == ["v1"]
    np.testing.assert_allclose(ro.read("v1", "appearance"), a.astype(np.float16), rtol=0, atol=0)
    np.testing.assert_allclose(ro.read("v1", "motion"), m.astype(np.float16), rtol=0, atol=0)
    assert ro.read("v2", "appearance").shape == (1, 2048)
    assert ro.read("v1", "appearance").dtype == np.float32
    attrs = ro.video_attrs("v1")
    assert attrs["status"] == "complete" and attrs["label"] == "jump" and attrs["fps"] == 25.0
    assert attrs["extracted_at"]
    info = ro.info()
    assert info["status"] == {"complete": 2, "failed": 0, "incomplete": 0}
    assert info["streams"] == {"appearance": 2048, "motion": 5}
    assert info["total_frames"] == 8
    assert info["class_names"] == ["jump", "run"]
    assert info["extractor"]["appearance"]["backbone"] == "resnet101"
    json.dumps(info)  # JSON-able
    with pytest.raises(PermissionError, match="read-only"):
        ro.write_video("v3", {"appearance": a})
    with pytest.raises(KeyError, match="no stream 'motion'"):
        ro.read("v2", "motion")
    with pytest.raises(KeyError, match="'nope' is not in store"):
        ro.read("nope", "appearance")


def test_failed_videos_record_why_and_are_not_listed(store_path: str) -> None:
    store = FeatureStore.create(store_path)
    store.mark_failed("broken", "broken.mp4: zero-byte file", label="jump")
    store.write_video("ok", {"appearance": np.ones((3, 4))}, label="jump")
    assert store.videos() == ["ok"]
    assert store.videos(status="failed") == ["broken"]
    assert store.status("broken") == "failed"
    assert store.info()["failed"] == [{"video_id": "broken", "error": "broken.mp4: zero-byte file"}]
    with pytest.raises(ValueError, match="is failed, not complete"):
        store.read("broken", "appearance")
    # a rerun that succeeds replaces the failure record
    store.write_video("broken", {"appearance": np.ones((2, 4))}, label="jump")
    assert store.status("broken") == "complete"
    assert store.info()["failed"] == []


@pytest.mark.parametrize(
    ("streams", "match"),
    [
        ({}, "no streams"),
        ({"appearance": np.ones(4)}, r"expected a \[T, d\] array"),
        ({"appearance": np.ones((0, 4))}, r"T, d >= 1"),
        ({"appearance": np.full((2, 4), np.nan)}, "NaN"),
        ({"appearance": np.full((2, 4), 1e6)}, "float16 range"),
        ({"appearance": np.ones((2, 4)), "motion": np.ones((3, 4))}, "streams differ in T"),
        ({"bad/name": np.ones((2, 4))}, "invalid stream name"),
    ],
)
def test_write_rejects_bad_arrays(tmp_path: Path, streams: dict, match: str) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match=match):
        store.write_video("v", streams)
    assert store.status("v") is None  # nothing half-written


def test_unsafe_video_id_rejected(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="not safe"):
        store.write_video("../escape", {"appearance": np.ones((2, 2))})


def test_complete_not_overwritten_without_flag(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr")
    store.write_video("v", {"appearance": np.ones((2, 2))})
    with pytest.raises(FileExistsError, match="already complete"):
        store.write_video("v", {"appearance": np.zeros((2, 2))}, overwrite=False)
    np.testing.assert_array_equal(store.read("v", "appearance"), np.ones((2, 2)))


def test_extractor_mismatch_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    FeatureStore.create(path, extractor={"appearance": {"backbone": "resnet101", "weights": "a"}})
    with pytest.raises(ValueError, match="differs from the requested"):
        FeatureStore.create(
            path, extractor={"appearance": {"backbone": "resnet50", "weights": "a"}}
        )
    # adding a new stream is fine
    s = FeatureStore.create(path, extractor={"motion": {"backbone": "resnet101"}})
    assert set(s.extractor) == {"appearance", "motion"}


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no framepool store"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:  # not zarr's "No group found ... at path ''"
        FeatureStore.open(tmp_path / "empty")
    assert str(err.value).startswith(f"no framepool store at {tmp_path / 'empty'} ")
    with pytest.raises(ValueError, match="mode must be"):
        FeatureStore.open(tmp_path, "w")  # type: ignore[arg-type]


_KILL_SCRIPT = """
import os, signal, sys
import numpy as np
from storage import FeatureStore
store = FeatureStore.create(sys.argv[1])
store.write_video("done", {"appearance": np.ones((4, 8))}, label="a")
# Start a second video, then die before it is marked complete.
videos = store._videos_group()
grp = videos.create_group("half", overwrite=True, attributes={"status": "incomplete"})
z = grp.create_array(name="appearance", shape=(4, 8), dtype="float16", chunks=(4, 8))
z[:2] = 1
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_mid_write_never_marks_complete(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(path)], check=False)
    assert proc.returncode == -9
    store = FeatureStore.open(path, "r")
    assert store.videos() == ["done"]
    assert store.status("half") == "incomplete"
    assert store.videos(status="incomplete") == ["half"]


def test_split_lists(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr")
    for vid in ("a", "b", "c"):
        store.write_video(vid, {"appearance": np.ones((2, 2))}, label="x")
    store.set_split_list("ucf101-1", {"train": ["a", "b"], "test": ["c"]})
    assert store.videos(split="ucf101-1/train") == ["a", "b"]
    assert store.videos(split="ucf101-1/test") == ["c"]
    with pytest.raises(KeyError, match="not found"):
        store.videos(split="ucf101-2/train")


def test_class_names_merged(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr", class_names=["b", "a"])
    assert store.class_names == ["a", "b"]
    FeatureStore.create(tmp_path / "s.zarr", class_names=["c"])
    assert FeatureStore.open(tmp_path / "s.zarr").class_names == ["a", "b", "c"]


def test_cache_roundtrip_and_invalidation(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr")
    arrays = store.write_cache("nodes", "k1", {"means": ((2, 3), "float32", (2, 3))})
    assert store.read_cache("nodes", "k1") is None  # not finished yet
    arrays["means"][...] = np.arange(6).reshape(2, 3)
    store.finish_cache("nodes", "k1")
    got = store.read_cache("nodes", "k1")
    assert got is not None
    np.testing.assert_array_equal(got["means"][...], np.arange(6).reshape(2, 3))
    store.write_cache("nodes", "k2", {"means": ((1,), "float32", (1,))})
    assert store.read_cache("nodes", "k1") is None  # superseded entries are removed


def test_safe_ids() -> None:
    assert safe_video_id("v_Basketball g01 (1)") == "v_Basketball_g01_1_"
    assert safe_video_id(".hidden") == "_hidden"
    ids = assign_video_ids(["/a/x.mp4", "/b/x.mp4", "/c/y.avi"])
    assert ids["/c/y.avi"] == "y"
    assert ids["/a/x.mp4"] != ids["/b/x.mp4"]
    assert ids["/a/x.mp4"].startswith("x-") and ids["/b/x.mp4"].startswith("x-")
    # deterministic, independent of order
    assert assign_video_ids(["/b/x.mp4", "/a/x.mp4", "/c/y.avi"]) == ids
    with pytest.raises(ValueError, match="empty"):
        safe_video_id("")


def test_map_streams_are_4d_with_their_own_length(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s.zarr")
    fmap = np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4) / 8
    store.write_video("v", {"appearance": np.ones((5, 4)), "appearance_map": fmap})
    assert store.streams("v") == ["appearance", "appearance_map"]
    np.testing.assert_array_equal(store.read("v", "appearance_map"), fmap)
    assert store.n_frames("v", "appearance_map") == 2
    assert store.info()["streams"] == {"appearance": 4, "appearance_map": 4}
    with pytest.raises(ValueError, match=r"T, d >= 1"):
        store.write_video("w", {"appearance_map": np.ones((2, 3, 4))})
