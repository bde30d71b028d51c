"""Batch extraction into a store: every real clip, bad inputs, batching, resuming, sharding."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from api.cli import main
from extractor.decode import count_frames
from extractor.features import FeatureExtractor
from extractor.flow import sha256_file
from extractor.pipeline import ExtractionSummary, run_extraction
from extractor.sources import Source, make_sources
from extractor.spec import BackboneSpec
from storage import FeatureStore
from tests.extractor.conftest import textured_frames, write_clip

BAD_PROBLEMS = {
    "zero": "empty file",
    "text": "cannot be read as a video",
    "audio": "no video stream",
    "truncated_avi": "truncated",
    "truncated_mp4": "cannot be read as a video",
    "missing": "no such file",
}


@pytest.fixture(scope="module")
def resnet18() -> FeatureExtractor:
    # bf16 autocast where this CPU supports it (dtype "auto"), DIS flow
    return FeatureExtractor(
        BackboneSpec(weights="random", arch="resnet18"), device="cpu", batch_size=32
    )


@dataclass
class RealRun:
    store: Path
    summary: ExtractionSummary
    real_videos: list[Path]
    sources: list[Source]
    ids: dict[Path, str]


@pytest.fixture(scope="module")
def real_run(
    tmp_path_factory: pytest.TempPathFactory,
    real_videos: list[Path],
    bad_inputs: dict[str, Path],
    resnet18: FeatureExtractor,
) -> RealRun:
    """Every real clip plus every kind of bad input, in one run (the heaviest test here)."""
    store = tmp_path_factory.mktemp("real") / "features.zarr"
    sources = make_sources([*real_videos, *bad_inputs.values()], missing="keep")
    # each video its own group (what a labels CSV's group column gives), kept by good and bad
    sources = [replace(s, group=f"g{i}") for i, s in enumerate(sources)]
    summary = run_extraction(sources, store, resnet18, workers=2, progress=False)
    return RealRun(store, summary, real_videos, sources, {s.path: s.video_id for s in sources})


def test_every_real_clip_has_one_feature_per_decoded_frame(
    real_run: RealRun, resnet18: FeatureExtractor
) -> None:
    store = FeatureStore.open(real_run.store)
    summary, real_videos, ids = real_run.summary, real_run.real_videos, real_run.ids
    assert sorted(summary.complete) == sorted(ids[p] for p in real_videos)
    assert store.extractor == resnet18.config()
    assert summary.frames == sum(store.video_attrs(ids[p])["n_frames"] for p in real_videos)
    for clip in real_videos:
        attrs = store.video_attrs(ids[clip])
        t = count_frames(clip)
        assert attrs["status"] == "complete"
        assert attrs["n_frames"] == t
        for stream in ("appearance", "motion"):
            feats = store.read(ids[clip], stream)
            assert feats.shape == (t, 512), (clip.name, stream)
            assert np.isfinite(feats).all()
        assert attrs["source"] == str(clip)
        assert attrs["source_sha256"] == sha256_file(clip)
        assert attrs["label"] == clip.parent.name
        assert attrs["fps"] > 0 and attrs["width"] >= 320 and attrs["height"] >= 240
        assert "frame_indices" not in attrs
    assert "videos" in store.class_names
    every = [s.video_id for s in real_run.sources]
    assert store.groups(every) == [s.group for s in real_run.sources]  # failed videos too


def test_bad_inputs_are_recorded_failed_with_a_reason(
    real_run: RealRun, bad_inputs: dict[str, Path]
) -> None:
    summary = real_run.summary
    store = FeatureStore.open(real_run.store)
    assert not summary.ok
    ids = real_run.ids
    for kind, bad in bad_inputs.items():
        attrs = store.video_attrs(ids[bad])
        assert attrs["status"] == "failed", kind
        assert str(bad) in attrs["error"] and BAD_PROBLEMS[kind] in attrs["error"]
        assert summary.failed[ids[bad]] == attrs["error"]
        assert store.streams(ids[bad]) == []
    assert set(store.videos(status="failed")) == {ids[p] for p in bad_inputs.values()}


def test_rerun_skips_complete_and_retries_failed(
    real_run: RealRun, resnet18: FeatureExtractor
) -> None:
    path, first = real_run.store, real_run.summary
    before = {v: FeatureStore.open(path).video_attrs(v)["extracted_at"] for v in first.complete}
    again = run_extraction(real_run.sources, path, resnet18, progress=False)
    assert again.complete == [] and sorted(again.skipped) == sorted(first.complete)
    assert again.failed == first.failed  # retried, and still bad for the same reasons
    store = FeatureStore.open(path)
    assert {v: store.video_attrs(v)["extracted_at"] for v in first.complete} == before


@pytest.fixture(scope="module")
def small_clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("small")
    out = []
    for i, n in enumerate([13, 1, 2, 7]):
        cls = "left" if i % 2 else "right"
        (d / cls).mkdir(exist_ok=True)
        out.append(write_clip(d / cls / f"clip{i}.avi", textured_frames(n, 96, 128, seed=i)))
    return out


def test_batches_across_videos_equal_one_video_at_a_time(
    tmp_path: Path, small_clips: list[Path]
) -> None:
    # batches of 5 frames cut chunks of 8 and mix videos of 13, 1, 2 and 7 frames
    fx = FeatureExtractor(
        BackboneSpec(weights="random", arch="resnet18", dtype="float32"), device="cpu", batch_size=5
    )
    clips = small_clips
    summary = run_extraction(make_sources(clips), tmp_path / "s", fx, workers=2, progress=False)
    assert summary.ok and len(summary.complete) == len(clips)
    store = FeatureStore.open(tmp_path / "s")
    alone = FeatureExtractor.from_config(store.extractor, device="cpu", batch_size=64)
    for clip in clips:
        ref = alone.extract_file(clip)
        for stream in ("appearance", "motion"):
            got = store.read(clip.stem, stream)
            np.testing.assert_allclose(got, ref.features[stream], rtol=2e-3, atol=2e-3)
    # a one-frame video: one row per stream
    assert store.read("clip1", "motion").shape == (1, 512)
    assert store.class_names == ["left", "right"]


def test_subsampling_is_recorded(tmp_path: Path, small_clips: list[Path]) -> None:
    fx = FeatureExtractor(
        BackboneSpec(streams=("appearance",), weights="random", arch="resnet18"),
        device="cpu",
        batch_size=4,
    )
    summary = run_extraction(
        make_sources(small_clips), tmp_path / "s", fx, stride=3, max_frames=3, progress=False
    )
    assert summary.ok
    store = FeatureStore.open(tmp_path / "s")
    attrs = store.video_attrs("clip0")
    assert attrs["n_frames"] == 13 and attrs["frame_indices"] == [0, 6, 12]
    assert store.read("clip0", "appearance").shape == (3, 512)
    assert store.video_attrs("clip1")["frame_indices"] == [0]


def test_shards_split_the_work_and_agree_on_classes(
    tmp_path: Path, small_clips: list[Path]
) -> None:
    fx = FeatureExtractor(
        BackboneSpec(streams=("appearance",), weights="random", arch="resnet18"),
        device="cpu",
        batch_size=8,
    )
    sources = make_sources(small_clips)
    runs = [
        run_extraction(sources, tmp_path / "s", fx, shard=(i, 2), max_frames=2, progress=False)
        for i in range(2)
    ]
    done = [set(r.complete) for r in runs]
    assert done[0].isdisjoint(done[1]) and done[0] | done[1] == {s.video_id for s in sources}
    assert [r.outside_shard for r in runs] == [len(done[1]), len(done[0])]
    store = FeatureStore.open(tmp_path / "s")
    assert store.class_names == ["left", "right"]
    assert len(store.videos()) == len(sources)


def test_adding_a_stream_keeps_the_other(tmp_path: Path, small_clips: list[Path]) -> None:
    clips = small_clips[:2]
    both_spec = BackboneSpec(weights="random", arch="resnet18", dtype="float32")
    app = FeatureExtractor(replace(both_spec, streams=("appearance",)), device="cpu")
    run_extraction(make_sources(clips), tmp_path / "s", app, progress=False)
    first = FeatureStore.open(tmp_path / "s").read("clip0", "appearance")
    both = FeatureExtractor(both_spec, device="cpu")
    summary = run_extraction(make_sources(clips), tmp_path / "s", both, progress=False)
    assert sorted(summary.complete) == ["clip0", "clip1"]
    store = FeatureStore.open(tmp_path / "s")
    assert store.streams("clip0") == ["appearance", "motion"]
    np.testing.assert_array_equal(store.read("clip0", "appearance"), first)
    with pytest.raises(ValueError, match="differs from the requested"):
        other_spec = replace(both_spec, streams=("appearance",), arch="resnet50")
        other = FeatureExtractor(other_spec, device="cpu")
        run_extraction(make_sources(clips), tmp_path / "s", other, progress=False)


def test_cli_exit_codes(
    tmp_path: Path,
    short_real_video: Path,
    bad_inputs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = str(tmp_path / "s")
    common = ["--store", store, "--weights", "random", "--arch", "resnet18", "--no-progress"]
    opts = [*common, "--streams", "appearance", "--max-frames", "4"]
    assert main(["extract", str(short_real_video), *opts]) == 0
    assert "1 extracted" in capsys.readouterr().out
    assert main(["extract", str(short_real_video), str(bad_inputs["zero"]), *opts]) == 1
    out = capsys.readouterr().out
    assert "1 already complete" in out and "1 failed" in out and str(bad_inputs["zero"]) in out
    for bad in (
        ["--shard", "2/2"],
        ["--streams", "appearance,depth"],
        ["--flow", "raft"],
        ["--batch-size", "0"],
    ):
        with pytest.raises(SystemExit) if bad[0] == "--batch-size" else _no_raise():
            assert main(["extract", str(short_real_video), *common, *bad]) == 2
    assert (
        main(["extract", str(short_real_video), *common[:2], "--weights", str(tmp_path / "w.pth")])
        == 2
    )
    assert "w.pth" in capsys.readouterr().err


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipeline_on_gpu(tmp_path: Path, small_clips: list[Path]) -> None:
    fx = FeatureExtractor(
        BackboneSpec(weights="random", arch="resnet18"), device="cuda", batch_size=5
    )
    assert fx.dtype == "bfloat16"
    summary = run_extraction(make_sources(small_clips), tmp_path / "s", fx, progress=False)
    assert summary.ok
    store = FeatureStore.open(tmp_path / "s")
    assert store.read("clip0", "motion").shape == (13, 512)
