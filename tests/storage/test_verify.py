"""Damage is an error, never zeros: read, train and `store verify` report a deleted or truncated
chunk by video and file; verify marks the video, and the next extract redoes it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from api.cli import main
from storage import CorruptVideoError, FeatureStore
from storage.files import files_for
from tests.conftest import real_clip


@pytest.fixture(params=["local", "memory"])
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "features.zarr")
    return f"memory://framepool-{uuid.uuid4().hex}"


def damaged_store(path: str) -> FeatureStore:
    rng = np.random.default_rng(0)
    store = FeatureStore.create(path)
    # 600 x 1024 float16 spans two chunks (512 rows each)
    for vid in ("ok", "lost", "cut", "flip"):
        store.write_video(
            vid,
            {"appearance": rng.standard_normal((600, 1024)), "motion": np.ones((600, 4))},
            label="x",
        )
    files = files_for(path)
    files.remove("videos/lost/appearance/c/1/0")
    raw = files.read("videos/cut/appearance/c/0/0")
    assert raw is not None
    files.write("videos/cut/appearance/c/0/0", raw[: len(raw) // 2])
    raw = files.read("videos/flip/motion/c/0/0")
    assert raw is not None
    files.write("videos/flip/motion/c/0/0", raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    return store


def test_read_names_the_video_and_the_file(store_path: str) -> None:
    store = damaged_store(store_path)
    assert store.read("ok", "appearance").shape == (600, 1024)
    with pytest.raises(CorruptVideoError, match=r"'lost'.*'videos/lost/appearance/c/1/0'.*missing"):
        store.read("lost", "appearance")
    with pytest.raises(CorruptVideoError, match=r"'cut'.*'videos/cut/appearance/c/0/0'.*checksum"):
        store.read("cut", "appearance")
    with pytest.raises(CorruptVideoError, match=r"'flip'.*videos/flip/motion/c/0/0"):
        store.read("flip", "motion")
    # the groups are plain Zarr: Zarr reads back what the store wrote (an edge chunk too) ...
    root = zarr.open_group(store_path, mode="r")
    ok = root["videos/ok/appearance"]
    assert isinstance(ok, zarr.Array) and root["videos/ok"].attrs["status"] == "complete"
    np.testing.assert_array_equal(ok[...], store.read("ok", "appearance", np.float16))
    # ... and sees the lost chunk as NaN, never as plausible zeros
    arr = root["videos/lost/appearance"]
    assert isinstance(arr, zarr.Array)
    assert np.isnan(arr[512:]).all() and not np.isnan(arr[:512]).any()


def test_verify_lists_marks_and_cli(store_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    damaged_store(store_path)
    assert main(["store", "verify", store_path, "--dry-run", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 4
    assert [(d["video_id"], d["key"]) for d in report["damaged"]] == [
        ("cut", "videos/cut/appearance/c/0/0"),
        ("flip", "videos/flip/motion/c/0/0"),
        ("lost", "videos/lost/appearance/c/1/0"),
    ]
    assert FeatureStore.open(store_path).videos() == ["cut", "flip", "lost", "ok"]  # dry run
    assert main(["store", "verify", store_path, "--workers", "3"]) == 1
    out = capsys.readouterr().out
    assert "3 damaged" in out and "lost: videos/lost/appearance/c/1/0" in out
    store = FeatureStore.open(store_path)
    assert store.videos() == ["ok"]
    assert store.videos(status="incomplete") == ["cut", "flip", "lost"]
    assert "damaged" in store.video_attrs("lost")["error"]
    assert main(["store", "verify", store_path]) == 0  # nothing complete is damaged now
    # the marks live in the groups: a rebuilt index agrees
    assert main(["store", "reindex", store_path]) == 0
    assert "reindexed" in capsys.readouterr().out
    assert FeatureStore.open(store_path).videos(status="incomplete") == ["cut", "flip", "lost"]


def test_older_layout_missing_chunk_found_by_count(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    store.write_video("new", {"appearance": np.ones((4, 4))}, label="x")
    # an array as older stores wrote it: fill value 0, no checksum (missing chunk -> zeros)
    root = zarr.open_group(path, mode="r+")
    grp = root["videos"].create_group(
        "old", attributes={"status": "complete", "label": "x", "streams": ["appearance"]}
    )
    grp.create_array(name="appearance", shape=(4, 4), dtype="float16", chunks=(2, 4))[...] = 1
    (path / "videos" / "old" / "appearance" / "c" / "1" / "0").unlink()
    damaged = FeatureStore.open(path).verify()
    assert [(d["video_id"], d["key"]) for d in damaged] == [("old", "videos/old/appearance/c/1/0")]


def test_train_reports_the_damaged_video(tmp_path: Path) -> None:
    from aggregator.node_cache import forget_node_caches
    from aggregator.train import train_run
    from tests.aggregator.toy_store import write_order_store

    path = tmp_path / "s.zarr"
    write_order_store(path, n_train=3, n_test=1, d=4)
    (path / "videos" / "c1_v002" / "appearance" / "c" / "0" / "0").unlink()
    forget_node_caches()
    with pytest.raises(CorruptVideoError, match=r"c1_v002.*c/0/0"):
        train_run(path, tmp_path / "run", head="gap", epochs=1, threads=1, progress=False)


def test_extract_redoes_a_damaged_video(tmp_path: Path) -> None:
    from extractor.pipeline import run_extract
    from extractor.spec import BackboneSpec

    clip = real_clip("mm_demo.mp4")
    store_path = tmp_path / "s.zarr"
    spec = BackboneSpec(streams=("appearance",), weights="random", arch="resnet18")
    opts = {
        "device": "cpu",
        "max_frames": 3,
        "workers": 1,
        "progress": False,
    }
    first = run_extract([clip], store_path, spec, **opts)  # type: ignore[arg-type]
    assert first.complete == ["mm_demo"]
    before = FeatureStore.open(store_path).read("mm_demo", "appearance")
    (store_path / "videos" / "mm_demo" / "appearance" / "c" / "0" / "0").unlink()
    again = run_extract([clip], store_path, spec, **opts)  # type: ignore[arg-type]
    assert again.skipped == ["mm_demo"]  # extract alone does not read every feature back
    assert main(["store", "verify", str(store_path)]) == 1
    redo = run_extract([clip], store_path, spec, **opts)  # type: ignore[arg-type]
    assert redo.complete == ["mm_demo"]
    store = FeatureStore.open(store_path)
    assert store.status("mm_demo") == "complete"
    np.testing.assert_allclose(store.read("mm_demo", "appearance"), before, rtol=1e-2, atol=1e-2)
