"""Spatial map streams: shapes, strides, dtype, the same forward pass, on real clips."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from api.cli import main
from extractor.features import FeatureExtractor
from extractor.pipeline import run_extract
from extractor.spec import BackboneSpec
from storage import FeatureStore

STREAMS = ["appearance", "motion", "appearance_map", "motion_map"]


def _clips(real_videos: list[Path]) -> list[Path]:
    names = ("mm_part_0.mp4", "mm_test.avi")  # an mp4 and an avi, 32 + 164 frames
    return [p for p in real_videos if p.name in names]


def _extract(clips: list[Path], store: Path, **kw: object) -> None:
    summary = run_extract(
        clips,
        store,
        BackboneSpec(
            streams=kw.pop("streams", ("appearance", "motion")),  # type: ignore[arg-type]
            weights="random",
            arch="resnet18",
            dtype="float32",
        ),
        maps=kw.pop("maps", ["appearance_map", "motion_map"]),  # type: ignore[arg-type]
        device="cpu",
        batch_size=3,  # batches split chunks and cross videos
        workers=2,
        max_frames=5,
        progress=False,
        **kw,  # type: ignore[arg-type]
    )
    assert summary.ok and len(summary.complete) == len(clips), summary.format()


@pytest.fixture(scope="module")
def strided(tmp_path_factory: pytest.TempPathFactory, real_videos: list[Path]) -> FeatureStore:
    store = tmp_path_factory.mktemp("maps") / "maps.zarr"
    _extract(_clips(real_videos), store, map_stride=2)
    return FeatureStore.open(store)


def test_map_streams_of_real_clips_have_shapes_strides_and_dtype(strided: FeatureStore) -> None:
    assert len(strided.videos()) == 2
    for vid in strided.videos():
        attrs = strided.video_attrs(vid)
        assert strided.streams(vid) == sorted(STREAMS)
        kept = np.asarray(attrs["frame_indices"])
        assert len(kept) == 5
        assert attrs["map_frame_indices"] == kept[::2].tolist() and attrs["map_stride"] == 2
        for name, source in (("appearance_map", "appearance"), ("motion_map", "motion")):
            fmap = strided.read(vid, name)
            assert fmap.shape == (3, 7, 7, 512)
            # stored as float16: reading as float16 loses nothing
            assert np.array_equal(
                strided.read(vid, name, dtype=np.float16).astype(np.float32), fmap
            )
            assert strided.read(vid, source).shape == (5, 512)
    cfg = strided.extractor["appearance_map"]
    assert cfg["source_stream"] == "appearance" and cfg["frame_stride"] == 2
    assert cfg["projection"] is None and cfg["channels"] == 512
    assert strided.info()["streams"]["motion_map"] == 512


def test_spatial_mean_of_a_map_is_the_pooled_vector_of_its_frame(strided: FeatureStore) -> None:
    for vid in strided.videos():
        for name, source in (("appearance_map", "appearance"), ("motion_map", "motion")):
            fmap = strided.read(vid, name).astype(np.float64)
            pooled = strided.read(vid, source)[::2]  # the map frames are every 2nd kept frame
            scale = float(np.abs(pooled).max())
            assert scale > 0.01  # features of a real clip, not zeros
            # both sides are float16 roundings of one float32 tensor: its mean, and its cells
            np.testing.assert_allclose(fmap.mean(axis=(1, 2)), pooled, atol=2e-3 * scale, rtol=2e-3)
            wrong = strided.read(vid, source)[1::2]
            assert np.abs(fmap[: len(wrong)].mean(axis=(1, 2)) - wrong).max() > 1e-2 * scale


def test_reduced_maps_are_the_recorded_projection(tmp_path: Path, real_videos: list[Path]) -> None:
    clip = _clips(real_videos)[:1]
    store_path = tmp_path / "reduced.zarr"
    _extract(
        clip, store_path, streams=("appearance",), maps=["appearance_map"], map_dim=16, map_seed=3
    )
    store = FeatureStore.open(store_path)
    (vid,) = store.videos()
    proj = store.extractor["appearance_map"]["projection"]
    assert proj["out_channels"] == 16 and proj["in_channels"] == 512 and proj["seed"] == 3
    rng = np.random.Generator(np.random.PCG64(3))
    matrix = (rng.standard_normal((512, 16)) / np.sqrt(16)).astype(np.float32)
    assert hashlib.sha256(matrix.tobytes()).hexdigest() == proj["sha256"]
    fmap = store.read(vid, "appearance_map")
    assert fmap.shape == (5, 7, 7, 16)
    expected = store.read(vid, "appearance").astype(np.float64) @ matrix
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(fmap.mean(axis=(1, 2)), expected, atol=5e-3 * scale, rtol=5e-3)
    assert "motion" not in store.streams(vid)


def test_maps_come_from_the_same_forward_pass() -> None:
    ex = FeatureExtractor(
        BackboneSpec(streams=("appearance",), weights="random", arch="resnet18", dtype="float32"),
        device="cpu",
    )
    ex.set_maps(["appearance_map"])
    calls = []
    ex.models["appearance"].register_forward_pre_hook(lambda *_: calls.append(1))
    batch = {"appearance": np.random.default_rng(0).integers(0, 255, (4, 224, 224, 3), np.uint8)}
    feats, maps = ex.embed_with_maps(batch, np.array([1, 3]))
    assert len(calls) == 1
    assert maps["appearance_map"].shape == (2, 7, 7, 512)
    assert maps["appearance_map"].dtype == np.float16
    assert np.array_equal(feats["appearance"], ex.embed(batch)["appearance"])
    mean = maps["appearance_map"].astype(np.float32).mean(axis=(1, 2))
    torch.testing.assert_close(
        torch.from_numpy(mean), torch.from_numpy(feats["appearance"][[1, 3]]), rtol=2e-3, atol=2e-3
    )


def test_bad_map_requests_are_refused(tmp_path: Path, real_videos: list[Path]) -> None:
    ex = FeatureExtractor(
        BackboneSpec(streams=("appearance",), weights="random", arch="resnet18", dtype="float32"),
        device="cpu",
    )
    with pytest.raises(ValueError, match="source streams"):
        ex.set_maps(["motion_map"])
    with pytest.raises(ValueError, match="maps must be"):
        ex.set_maps(["depth_map"])
    with pytest.raises(ValueError, match="stride"):
        ex.set_maps(["appearance_map"], stride=0)
    clip = str(_clips(real_videos)[0])
    store = str(tmp_path / "s.zarr")
    common = ["--store", store, "--arch", "resnet18", "--weights", "random", "--max-frames", "2"]
    assert main(["extract", clip, *common, "--map-stride", "2"]) == 2  # no map stream
    # an unknown stream name is a usage error from the command
    assert main(["extract", clip, *common, "--streams", "appearance,depth_map"]) == 2


def test_cli_extracts_maps_and_adding_a_stream_keeps_them(
    tmp_path: Path, real_videos: list[Path]
) -> None:
    clip = str(_clips(real_videos)[0])
    store = str(tmp_path / "cli.zarr")
    common = ["--store", store, "--arch", "resnet18", "--weights", "random", "--max-frames", "4"]
    common += ["--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert main(["extract", clip, *common, "--streams", "appearance_map", "--map-stride", "3"]) == 0
    fs = FeatureStore.open(store)
    (vid,) = fs.videos()
    assert fs.streams(vid) == ["appearance", "appearance_map"]  # the source stream comes along
    before = fs.read(vid, "appearance_map")
    assert before.shape == (2, 7, 7, 512)
    frames = fs.video_attrs(vid)["map_frame_indices"]
    assert main(["extract", clip, *common, "--streams", "motion"]) == 0
    fs = FeatureStore.open(store)
    assert fs.streams(vid) == ["appearance", "appearance_map", "motion"]
    assert np.array_equal(fs.read(vid, "appearance_map"), before)
    assert fs.video_attrs(vid)["map_frame_indices"] == frames
