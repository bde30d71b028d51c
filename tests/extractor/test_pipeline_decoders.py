"""The pipeline with each decoder: torchcodec's frames give PyAV's features; RAFT batched in it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from api.cli import main
from extractor.decode_torchcodec import torchcodec_problem
from extractor.features import FeatureExtractor
from extractor.pipeline import run_extraction
from extractor.sources import make_sources
from extractor.spec import BackboneSpec
from storage import FeatureStore
from tests.extractor.conftest import textured_frames, write_clip

needs_torchcodec = pytest.mark.skipif(
    torchcodec_problem() is not None, reason=str(torchcodec_problem())
)
SPEC = BackboneSpec(weights="random", arch="resnet18", dtype="float32")


def _clips(real_videos: list[Path]) -> list[Path]:
    names = ("mm_part_0.mp4", "mm_test.avi")  # h264 in MP4, mpeg4 with B-frames in AVI
    return [p for p in real_videos if p.name in names]


@needs_torchcodec
def test_torchcodec_pipeline_gives_pyav_features(tmp_path: Path, real_videos: list[Path]) -> None:
    clips = _clips(real_videos)
    fx = FeatureExtractor(replace(SPEC, streams=("appearance",)), device="cpu", batch_size=8)
    stores = {}
    for decoder in ("pyav", "torchcodec"):
        stores[decoder] = tmp_path / decoder
        summary = run_extraction(
            make_sources(clips), stores[decoder], fx, workers=2, max_frames=4, decoder=decoder
        )
        assert summary.ok and len(summary.complete) == 2, summary.format()
    a, b = (FeatureStore.open(stores[d]) for d in ("pyav", "torchcodec"))
    for vid in a.videos():
        assert a.video_attrs(vid)["n_frames"] == b.video_attrs(vid)["n_frames"]
        np.testing.assert_array_equal(a.read(vid, "appearance"), b.read(vid, "appearance"))


def test_cli_decoder_and_flow_dtype_options(tmp_path: Path, short_real_video: Path) -> None:
    common = ["--store", str(tmp_path / "s"), "--weights", "random", "--arch", "resnet18"]
    common += ["--no-progress", "--streams", "appearance", "--max-frames", "3", "--device", "cpu"]
    assert main(["extract", str(short_real_video), *common, "--decoder", "pyav"]) == 0
    assert main(["extract", str(short_real_video), *common, "--flow-precision", "bf16"]) == 2
    with pytest.raises(SystemExit):
        main(["extract", str(short_real_video), *common, "--decoder", "nvdec"])


def test_raft_bf16_in_the_pipeline(tmp_path: Path) -> None:
    from torchvision.models.optical_flow import raft_small

    clip = write_clip(tmp_path / "two.avi", textured_frames(2, 48, 64))  # one flow field
    torch.manual_seed(0)
    weights = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)
    spec = replace(
        SPEC,
        streams=("motion",),
        flow="raft",
        flow_weights=weights,
        flow_params={"num_flow_updates": 1, "dtype": "bfloat16"},
    )
    fx = FeatureExtractor(spec, device="cpu", batch_size=8)
    summary = run_extraction(make_sources([clip]), tmp_path / "s", fx, workers=2)
    assert summary.ok, summary.format()
    store = FeatureStore.open(tmp_path / "s")
    assert store.extractor["motion"]["flow"]["dtype"] == "bfloat16"
    (vid,) = store.videos()
    assert store.read(vid, "motion").shape == (2, 512)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_torchcodec
def test_nvdec_pipeline_close_to_pyav(tmp_path: Path, real_videos: list[Path]) -> None:
    clips = _clips(real_videos)
    fx = FeatureExtractor(SPEC, device="cuda", batch_size=8)
    stores = {}
    for decoder in ("pyav", "auto"):  # auto on CUDA: torchcodec with NVDEC
        stores[decoder] = tmp_path / decoder
        summary = run_extraction(
            make_sources(clips), stores[decoder], fx, workers=2, max_frames=12, decoder=decoder
        )
        assert summary.ok, summary.format()
    a, b = (FeatureStore.open(stores[d]) for d in ("pyav", "auto"))
    for vid in a.videos():
        for stream in ("appearance", "motion"):
            x, y = a.read(vid, stream), b.read(vid, stream)
            cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            print(f"{vid} {stream}: cosine NVDEC vs PyAV min {cos.min():.5f}")
            assert cos.min() > 0.99, (vid, stream, cos.min())
