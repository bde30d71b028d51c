"""Fine-tuning on real clips: cached inputs equal the extractor's, a job runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.finetune.inputs import InputCache, StoreFeatures, prepare_inputs
from aggregator.finetune.job import run_finetune_job, start_extractor
from aggregator.finetune.loop import FinetuneSettings
from extractor.backbones import build_backbone
from extractor.flow import DisFlow
from extractor.prepare import FrameChunk, prepare_video
from extractor.spec import BackboneSpec
from extractor.transforms import normalize_motion
from storage import FeatureStore


def test_cached_motion_fields_rebuild_the_extractor_stacks(short_real_video: Path) -> None:
    """Fields + tail (10x smaller than stacks) give back exactly the stacks extraction uses."""
    chunks = [
        c
        for c in prepare_video(short_real_video, streams=("appearance", "motion"), flow=DisFlow())
        if isinstance(c, FrameChunk)
    ]
    stacks = np.concatenate([c.motion for c in chunks if c.motion is not None])
    crops = np.concatenate([c.appearance for c in chunks if c.appearance is not None])
    video = prepare_inputs(short_real_video, streams=("appearance", "motion"), flow=DisFlow())
    assert video.n_frames == video.n_decoded == len(stacks) == 32
    assert video.motion_fields is not None and video.motion_fields.shape[0] == 32 + 9
    assert np.array_equal(video.appearance, crops)
    motion = video.frames(torch.device("cpu"))["motion"]
    got = motion.take(torch.arange(32)) if not isinstance(motion, torch.Tensor) else motion
    ref = normalize_motion(torch.from_numpy(stacks))
    assert torch.equal(got, ref)


@pytest.fixture(scope="module")
def two_clips(real_videos: list[Path]) -> dict[str, Path]:
    names = ("mm_part_0.mp4", "mm_demo_spatiotemporal_det.mp4")
    return {p.stem: p for p in real_videos if p.name in names}


SPEC = BackboneSpec(streams=("appearance", "motion"), arch="resnet18", weights="random")


def test_store_features_equal_the_computed_ones(two_clips: dict[str, Path], tmp_path: Path) -> None:
    """A store extracted with the same configuration serves the no-gradient frames."""
    fx = start_extractor(SPEC, torch.device("cpu"), amp=False)
    store = FeatureStore.create(tmp_path / "store.zarr", extractor=fx.config())
    vid, path = next(iter(two_clips.items()))
    ex = fx.extract_file(path, max_frames=5)
    store.write_video(vid, ex.features, label="a", meta={"n_frames": ex.n_frames})
    cache = InputCache(None, streams=fx.streams, flow=fx.flow, max_frames=5)
    video = cache.get(vid, path)
    assert video.frame_indices.tolist() == ex.frame_indices.tolist()
    known = StoreFeatures(store, fx.config(), device=torch.device("cpu"))
    assert known.streams == ["appearance", "motion"]
    # the store holds 5 of the 32 rows here (subsampled), so only an exact match is served
    feats = known.features(vid, video)
    assert feats is None  # no recorded frame_indices: not served
    store.update_video_attrs(vid, frame_indices=ex.frame_indices.tolist())
    feats = known.features(vid, video)
    assert feats is not None
    with torch.no_grad():
        for s, frames in video.frames(torch.device("cpu")).items():
            assert not isinstance(frames, torch.Tensor)
            computed = fx.models[s](frames.take(torch.arange(5)))
            assert torch.allclose(feats[s], computed, rtol=2e-3, atol=2e-3)
    other = StoreFeatures(
        store,
        {**fx.config(), "motion": {**fx.config()["motion"], "arch": "resnet50"}},
        device=torch.device("cpu"),
    )
    assert other.streams == ["appearance"] and "arch" in other.mismatch["motion"]


def test_job_on_real_clips(two_clips: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    labels = {v: f"class{i}" for i, v in enumerate(sorted(two_clips))}
    history = run_finetune_job(
        two_clips,
        labels,
        out,
        backbone=SPEC,
        settings=FinetuneSettings(period=2, epochs=2, batch_videos=2, chunk_size=4),
        head="tp",
        head_kwargs={"depth": 2, "node_dim": 16},
        max_frames=4,
        reuse_features=True,  # epoch 2 reads the other frames' features from OUT/features
    )
    assert [(h["frames_total"], h["frames_with_grad"]) for h in history] == [(8, 4), (8, 4)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["epochs"][0]) >= {
        "epoch",
        "frames_with_grad",
        "frames_total",
        "loss",
        "accuracy",
        "seconds",
    }
    assert not (out / "inputs").exists()  # decoded inputs are removed after a finished run
    assert not (out / "features").exists()
    for stream in ("appearance", "motion"):
        state = torch.load(out / f"backbone_{stream}.pt", weights_only=True)
        tuned = build_backbone(stream, out / f"backbone_{stream}.pt", arch="resnet18")
        for k, v in tuned.state_dict().items():
            assert torch.equal(v, state[k]), k
    start = build_backbone("motion", "random", arch="resnet18").state_dict()
    assert not torch.equal(start["conv1.weight"], state["conv1.weight"])  # it did train
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == sorted(labels.values())
    assert config["extractor"]["appearance"]["weights_origin"] == "file"
    assert (out / "model.pt").is_file() and (out / "head.pt").is_file()
