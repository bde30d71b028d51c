from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extractor.backbones import build_backbone
from extractor.decode import VideoError
from extractor.features import FeatureExtractor, resolve_dtype
from extractor.spec import BackboneSpec
from tests.extractor.conftest import textured_frames, write_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "tex.avi", textured_frames(13, 96, 128))


def test_extract_file_and_rebuild_from_config(clip: Path, tmp_path: Path) -> None:
    fx = FeatureExtractor(
        BackboneSpec(weights="random", arch="resnet18", dtype="float32"), device="cpu", batch_size=5
    )
    video = fx.extract_file(clip)
    assert video.n_frames == 13
    np.testing.assert_array_equal(video.frame_indices, np.arange(13))
    assert {s: f.shape for s, f in video.features.items()} == {
        "appearance": (13, 512),
        "motion": (13, 512),
    }
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in video.features.values())
    assert (video.width, video.height, video.fps) == (128, 96, 25.0)

    config = fx.config()
    assert json.loads(json.dumps(config)) == config
    assert config["appearance"]["weights"] == "random" and config["appearance"]["seed"] == 0
    assert config["motion"]["flow"]["backend"] == "dis"
    assert config["motion"]["flow_bound"] == 20.0 and config["motion"]["stack_length"] == 10
    assert config["motion"]["arch"] == "resnet18" and config["motion"]["dtype"] == "float32"

    again = FeatureExtractor.from_config(config, device="cpu", batch_size=13)
    assert again.config() == config
    other = again.extract_file(clip)
    for s in ("appearance", "motion"):  # another batch size: same features up to fp32 rounding
        np.testing.assert_allclose(other.features[s], video.features[s], rtol=1e-4, atol=1e-5)

    sub = fx.extract_file(clip, stride=4)
    np.testing.assert_array_equal(sub.frame_indices, [0, 4, 8, 12])
    np.testing.assert_allclose(
        sub.features["motion"], video.features["motion"][[0, 4, 8, 12]], rtol=1e-4, atol=1e-5
    )

    only = FeatureExtractor.from_config(config, device="cpu", streams=["appearance"])
    assert only.streams == ("appearance",) and only.flow is None


def test_from_config_checks_weight_files(clip: Path, tmp_path: Path) -> None:
    path = tmp_path / "rgb.pth"
    state = build_backbone("appearance", "random", "resnet18").state_dict()
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, path)
    fx = FeatureExtractor(
        BackboneSpec(streams=("appearance",), weights=path, arch="resnet18"), device="cpu"
    )
    config = fx.config()
    assert config["appearance"]["weights_path"] == str(path.resolve())
    moved = tmp_path / "moved.pth"
    path.rename(moved)
    with pytest.raises(FileNotFoundError, match="rgb\\.pth"):
        FeatureExtractor.from_config(config, device="cpu")
    FeatureExtractor.from_config(config, device="cpu", weights_paths={"appearance": moved})
    state = torch.load(moved)
    state["conv1.weight"] += 1
    torch.save(state, moved)
    with pytest.raises(ValueError, match="has changed since extraction"):
        FeatureExtractor.from_config(config, device="cpu", weights_paths={"appearance": moved})
    with pytest.raises(ValueError, match="differs from the recorded one"):
        tampered = {"appearance": {**config["appearance"], "weights_origin": "random", "seed": 0}}
        FeatureExtractor.from_config(tampered, device="cpu")


def test_bad_arguments_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="streams"):
        FeatureExtractor(
            BackboneSpec(streams=("depth",), weights="random", arch="resnet18"), device="cpu"
        )
    with pytest.raises(ValueError, match="'sift'"):
        FeatureExtractor(BackboneSpec(flow="sift", weights="random", arch="resnet18"), device="cpu")
    with pytest.raises(ValueError, match="--flow-weights PATH"):
        FeatureExtractor(BackboneSpec(flow="raft", weights="random", arch="resnet18"), device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("half", torch.device("cpu"))
    fx = FeatureExtractor(
        BackboneSpec(streams=("appearance",), weights="random", arch="resnet18"), device="cpu"
    )
    with pytest.raises(VideoError, match="missing\\.mp4"):
        fx.extract_file(tmp_path / "missing.mp4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_channels_last_matches_cpu_fp32(clip: Path) -> None:
    cpu = FeatureExtractor(
        BackboneSpec(weights="random", arch="resnet18", dtype="float32"), device="cpu"
    )
    gpu = FeatureExtractor(
        BackboneSpec(weights="random", arch="resnet18", dtype="bfloat16"), device="cuda"
    )
    assert gpu.config()["appearance"]["dtype"] == "bfloat16"
    a, b = cpu.extract_file(clip), gpu.extract_file(clip)
    for s in ("appearance", "motion"):
        cos = (a.features[s] * b.features[s]).sum(1) / (
            np.linalg.norm(a.features[s], axis=1) * np.linalg.norm(b.features[s], axis=1)
        )
        assert cos.min() > 0.99
