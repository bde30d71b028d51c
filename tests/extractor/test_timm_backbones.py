"""timm appearance backbones: their own preprocessing, weights from timm or a file, motion stays
a ResNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from extractor.backbones import (
    appearance_input,
    build_backbone,
    feature_dim,
    load_backbone,
    resolve_weights,
    state_sha256,
)
from extractor.features import FeatureExtractor
from extractor.prepare import FrameChunk, prepare_video
from extractor.spec import BackboneSpec
from extractor.transforms import DEFAULT_APPEARANCE_INPUT, center_crop, resize_shorter

TINY = "timm:test_vit"  # 0.3 M parameters, 160x160 input, mean/std 0.5, crop_pct 0.95


def test_timm_preprocessing_is_the_models_own() -> None:
    app = appearance_input(TINY)
    assert (app.crop_size, app.resize_shorter, app.interpolation) == (160, 168, "bicubic")
    assert app.mean == (0.5, 0.5, 0.5) and app.std == (0.5, 0.5, 0.5)
    assert appearance_input("resnet18") == DEFAULT_APPEARANCE_INPUT
    assert feature_dim(TINY) == 64


def test_timm_random_weights_are_reproducible_and_finite() -> None:
    a = build_backbone("appearance", "random", TINY)
    b = build_backbone("appearance", "random", TINY)
    assert state_sha256(a) == state_sha256(b)
    _, other = load_backbone("appearance", resolve_weights("random", TINY, seed=1), TINY)
    assert other["state_sha256"] != state_sha256(a)
    with torch.inference_mode():
        y = a(torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0)))
    assert y.shape == (2, 64) and torch.isfinite(y.half()).all()


def test_timm_weights_from_a_file_with_or_without_the_classifier(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("test_vit", pretrained=False, num_classes=10)  # with a head
    torch.save({"state_dict": full.state_dict()}, tmp_path / "vit.pth")
    save_file(full.state_dict(), str(tmp_path / "vit.safetensors"))
    body = {k: v for k, v in full.state_dict().items() if not k.startswith("head.")}
    for name in ("vit.pth", "vit.safetensors"):
        model, record = load_backbone("appearance", resolve_weights(tmp_path / name, TINY), TINY)
        got = model.state_dict()
        assert sorted(got) == sorted(body)
        assert all(torch.equal(got[k], v) for k, v in body.items())
        assert record["weights_origin"] == "file" and len(record["weights"]) == 64
    other = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    torch.save(other.state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(ValueError, match="do not fit timm:test_vit"):
        build_backbone("appearance", tmp_path / "convnext.pth", TINY)


def test_timm_pretrained_offline_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = resolve_weights("imagenet", TINY)
    assert spec.origin == "timm-pretrained"
    with pytest.raises(FileNotFoundError, match="Hugging Face cache") as err:
        load_backbone("appearance", spec, TINY)
    assert "test_vit" in str(err.value) and "--weights PATH" in str(err.value)


def test_motion_stays_a_resnet_and_bad_names_are_named() -> None:
    with pytest.raises(ValueError, match="20-channel conv1"):
        build_backbone("motion", "random", TINY)
    with pytest.raises(ValueError, match="--motion-arch"):
        FeatureExtractor(BackboneSpec(arch=TINY, weights="random"), device="cpu")
    with pytest.raises(ValueError, match="'no_such_model'"):
        build_backbone("appearance", "random", "timm:no_such_model")


def test_timm_crops_follow_the_models_geometry(short_real_video: Path) -> None:
    app = appearance_input(TINY)
    chunks = [
        c
        for c in prepare_video(short_real_video, streams=("appearance",), appearance_input=app)
        if isinstance(c, FrameChunk)
    ]
    assert chunks and all(c.appearance.shape[1:] == (160, 160, 3) for c in chunks)  # type: ignore[union-attr]
    from extractor.decode import iter_frames

    first = next(iter(iter_frames(short_real_video)))
    want = center_crop(resize_shorter(first, 168, "bicubic"), 160)
    np.testing.assert_array_equal(chunks[0].appearance[0], np.asarray(want)[0])  # type: ignore[index]


def test_extractor_with_timm_appearance_and_resnet_motion(short_real_video: Path) -> None:
    fx = FeatureExtractor(
        BackboneSpec(arch=TINY, motion_arch="resnet18", weights="random", dtype="float32"),
        device="cpu",
    )
    video = fx.extract_file(short_real_video, max_frames=3)
    assert video.features["appearance"].shape == (3, 64)
    assert video.features["motion"].shape == (3, 512)
    cfg = fx.config()
    assert cfg["appearance"]["arch"] == TINY and cfg["motion"]["arch"] == "resnet18"
    assert cfg["appearance"]["input_size"] == 160 and cfg["appearance"]["resize_shorter"] == 168
    assert cfg["appearance"]["normalize_mean"] == [0.5, 0.5, 0.5]
    again = FeatureExtractor.from_config(cfg, device="cpu")
    assert again.appearance_input == fx.appearance_input
    np.testing.assert_array_equal(
        again.extract_file(short_real_video, max_frames=3).features["appearance"],
        video.features["appearance"],
    )
