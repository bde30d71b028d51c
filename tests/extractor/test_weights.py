"""ImageNet checkpoints: fetched into the hub cache when missing, hash checked, clear offline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from extractor import weights
from extractor.backbones import build_backbone, load_backbone, resolve_weights, state_sha256


def test_urls_are_torchvisions_v1_checkpoints() -> None:
    for arch, enum in (
        ("resnet18", tvm.ResNet18_Weights),
        ("resnet50", tvm.ResNet50_Weights),
        ("resnet101", tvm.ResNet101_Weights),
    ):
        assert weights.IMAGENET_URLS[arch] == enum.IMAGENET1K_V1.url
    assert weights.hash_prefix(weights.IMAGENET_URLS["resnet101"]) == "63fe2227"


def _checkpoint_bytes(tmp_path: Path) -> tuple[bytes, str, torch.nn.Module]:
    src = build_backbone("appearance", "random", "resnet18")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    f = tmp_path / "made.pth"
    torch.save({**src.state_dict(), "fc.weight": torch.zeros(1000, 512)}, f)
    data = f.read_bytes()
    return data, hashlib.sha256(data).hexdigest(), src


def test_missing_checkpoint_is_fetched_into_the_hub_cache_and_hash_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, digest, src = _checkpoint_bytes(tmp_path)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    # the real URL's name carries the real file's hash prefix; our stand-in file has its own
    url = f"https://download.pytorch.org/models/resnet18-{digest[:8]}.pth"
    monkeypatch.setitem(weights.IMAGENET_URLS, "resnet18", url)
    calls: list[tuple[str, str]] = []

    def fake_fetch(u: str, dst: str) -> None:
        calls.append((u, dst))
        assert Path(dst).parent == hub / "checkpoints"  # written beside its final place
        Path(dst).write_bytes(data)

    monkeypatch.setattr(weights, "_torch_fetch", fake_fetch)
    spec = resolve_weights("imagenet", "resnet18")
    target = hub / "checkpoints" / f"resnet18-{digest[:8]}.pth"
    assert [c[0] for c in calls] == [url] and spec.path == target.resolve()
    assert spec.sha256 == digest and target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no partial file
    model, record = load_backbone("appearance", spec, "resnet18")
    assert state_sha256(model) == state_sha256(src) and record["weights_origin"] == "imagenet"
    resolve_weights("imagenet", "resnet18")  # cached now: no second fetch
    assert len(calls) == 1


def test_a_download_with_the_wrong_hash_is_rejected_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "checkpoints"

    def corrupt(u: str, dst: str) -> None:
        assert u == tvm.ResNet18_Weights.IMAGENET1K_V1.url
        Path(dst).write_bytes(b"truncated")

    with pytest.raises(ValueError, match="f37072fd"):
        weights.imagenet_checkpoint("resnet18", fetch=corrupt, folder=folder)
    assert list(folder.iterdir()) == []


def test_offline_error_names_the_file_the_folder_and_the_url(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"

    def offline(u: str, dst: str) -> None:
        raise OSError("Temporary failure in name resolution")

    with pytest.raises(FileNotFoundError) as err:
        weights.imagenet_checkpoint("resnet101", fetch=offline, folder=folder)
    msg = str(err.value)
    for part in ("resnet101-63fe2227.pth", str(folder), weights.IMAGENET_URLS["resnet101"]):
        assert part in msg
    assert "name resolution" in msg and list(folder.iterdir()) == []
    with pytest.raises(FileNotFoundError, match=r"resnet18-f37072fd\.pth"):
        weights.imagenet_checkpoint("resnet18", download=False, folder=folder)
    with pytest.raises(ValueError, match="'vit_tiny'"):
        weights.imagenet_checkpoint("vit_tiny", folder=folder)
