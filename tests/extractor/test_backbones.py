from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from extractor import weights as weights_module
from extractor.backbones import (
    build_backbone,
    cross_modality_conv1,
    feature_dim,
    fold_batchnorm,
    load_backbone,
    resolve_weights,
    state_sha256,
)


def test_cross_modality_conv1_is_the_replicated_channel_mean() -> None:
    rgb = torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    got = cross_modality_conv1(rgb, 20)
    assert got.shape == (64, 20, 7, 7)
    w = rgb.numpy()
    for o in range(64):
        mean = (w[o, 0] + w[o, 1] + w[o, 2]) / 3
        for c in range(20):
            np.testing.assert_allclose(got[o, c].numpy(), mean, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="RGB conv weights"):
        cross_modality_conv1(torch.zeros(64, 20, 7, 7))


def test_random_backbones_are_reproducible_and_shaped() -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    a = build_backbone("appearance", "random", "resnet18")
    b = build_backbone("appearance", "random", "resnet18")
    assert state_sha256(a) == state_sha256(b)
    with torch.inference_mode():
        ya, yb = a(x), b(x)
    assert ya.shape == (2, feature_dim("resnet18")) == (2, 512)
    assert torch.equal(ya, yb)
    assert 0.01 < float(ya.abs().max()) < 100  # O(1) activations, far inside float16
    m = build_backbone("motion", "random", "resnet18")
    assert m.conv1.weight.shape == (64, 20, 7, 7)
    torch.testing.assert_close(m.conv1.weight, cross_modality_conv1(a.conv1.weight))
    rest = {k: v for k, v in m.state_dict().items() if k != "conv1.weight"}
    for k, v in rest.items():
        assert torch.equal(v, a.state_dict()[k]), k
    with torch.inference_mode():
        assert m(torch.zeros(1, 20, 224, 224)).shape == (1, 512)


def test_other_seed_gives_other_weights() -> None:
    _, rec_a = load_backbone(
        "appearance", resolve_weights("random", "resnet18", seed=0), "resnet18"
    )
    _, rec_b = load_backbone(
        "appearance", resolve_weights("random", "resnet18", seed=1), "resnet18"
    )
    assert rec_a["state_sha256"] != rec_b["state_sha256"]
    assert (rec_a["weights"], rec_a["seed"], rec_b["seed"]) == ("random", 0, 1)


def test_state_dict_files_load_and_motion_conv1(tmp_path: Path) -> None:
    src = build_backbone("appearance", "random", "resnet18")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)  # not the random init, so loading is visible
    rgb_file = tmp_path / "rgb.pth"
    # as a training script would save it: wrapped, DDP prefix, with an fc head
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 512)
    state["module.fc.bias"] = torch.zeros(10)
    torch.save({"state_dict": state, "epoch": 3}, rgb_file)
    app = build_backbone("appearance", rgb_file, "resnet18")
    assert state_sha256(app) == state_sha256(src)
    motion, record = load_backbone("motion", resolve_weights(rgb_file, "resnet18"), "resnet18")
    torch.testing.assert_close(motion.conv1.weight, cross_modality_conv1(src.conv1.weight))
    assert record["conv1"].startswith("cross-modality") and record["weights_origin"] == "file"
    assert record["weights"] == resolve_weights(rgb_file, "resnet18").sha256

    # a fine-tuned motion backbone saved with state_dict() loads as it is
    with torch.no_grad():
        motion.conv1.weight.add_(torch.arange(20.0).view(1, 20, 1, 1))
    flow_file = tmp_path / "flow.pth"
    torch.save(motion.state_dict(), flow_file)
    again, record = load_backbone("motion", resolve_weights(flow_file, "resnet18"), "resnet18")
    assert torch.equal(again.conv1.weight, motion.conv1.weight)
    assert record["conv1"] == "20-channel conv1 as stored"
    with pytest.raises(ValueError, match="20-channel conv1; expected 3"):
        build_backbone("appearance", flow_file, "resnet18")
    with pytest.raises(ValueError, match="different --arch"):
        build_backbone("appearance", rgb_file, "resnet50")


def test_imagenet_weights_from_the_cache_never_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(url: str, dst: str) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights_module, "_torch_fetch", offline)
    with pytest.raises(FileNotFoundError) as err:
        build_backbone("appearance", "imagenet", "resnet18")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(hub / "checkpoints") in msg
    assert "--weights PATH" in msg and "network is unreachable" in msg
    src = build_backbone("appearance", "random", "resnet18")
    torch.save(
        {**src.state_dict(), "fc.weight": torch.zeros(1000, 512)},
        hub / "checkpoints" / "resnet18-f37072fd.pth",
    )

    def never(url: str, dst: str) -> None:
        raise AssertionError("a cached checkpoint must not be fetched again")

    monkeypatch.setattr(weights_module, "_torch_fetch", never)
    model, record = load_backbone("appearance", resolve_weights("imagenet", "resnet18"), "resnet18")
    assert state_sha256(model) == state_sha256(src)
    assert record["weights_origin"] == "imagenet" and len(record["weights"]) == 64


def test_missing_weights_path_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope\\.pth"):
        build_backbone("appearance", tmp_path / "nope.pth", "resnet18")
    with pytest.raises(ValueError, match="'resnet34'"):
        build_backbone("appearance", "random", "resnet34")
    with pytest.raises(ValueError, match="'depth'"):
        build_backbone("depth", "random", "resnet18")


def test_folded_batchnorm_computes_the_same_features() -> None:
    model = build_backbone("motion", "random", "resnet18")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial statistics, so that folding has something to fold
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # not in place
    x = torch.randn(2, 20, 224, 224, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
