"""A timm backbone and a torchvision one, end to end: extract real and generated clips into the
same store layout, train a head on each store, serve it and predict an upload."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.cli import main as cli_main
from api.service import Settings, create_app
from storage import FeatureStore
from tests.api.conftest import labelled_clips
from tests.conftest import real_video_paths

REAL = {"mm_part_0.mp4": "people", "mm_test.avi": "sport"}
BACKBONES = {
    "timm": ["--arch", "timm:test_vit", "--motion-arch", "resnet18"],
    "torchvision": ["--arch", "resnet18"],
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backbones")
    labels, _ = labelled_clips(root, REAL, n_per_class=2, n_frames=12, test_suffix="1")
    return labels


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_extract_train_serve(backbone: str, clips: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    with clips.open() as f:
        inputs = [row["path"] for row in csv.DictReader(f)]
    extract = ["extract", *inputs, "--store", str(store), "--labels", str(clips)]
    extract += ["--weights", "random", "--max-frames", "4", "--device", "cpu", "--no-progress"]
    assert cli_main([*extract, *BACKBONES[backbone]]) == 0

    fs = FeatureStore.open(store)
    info = fs.info()
    app_dim = 64 if backbone == "timm" else 512
    assert info["streams"] == {"appearance": app_dim, "motion": 512}
    assert info["status"]["complete"] == len(inputs)
    cfg = info["extractor"]
    assert cfg["appearance"]["arch"] == BACKBONES[backbone][1]
    assert cfg["motion"]["arch"] == "resnet18" and cfg["motion"]["in_channels"] == 20
    vid = fs.videos()[0]
    assert fs.read(vid, "appearance").shape == (4, app_dim)

    run = tmp_path / "run"
    train = ["train", "--store", str(store), "--head", "gap", "--out", str(run)]
    train += ["--epochs", "3", "--val-fraction", "0", "--device", "cpu", "--no-plots"]
    assert cli_main(train) == 0

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    settings = Settings(runs=[run], store=store, upload_dir=uploads, workers=1)
    clip = real_video_paths()[0]
    with TestClient(create_app(settings)) as client, clip.open("rb") as f:
        r = client.post("/v1/predict", params={"max_frames": 2}, files={"file": ("clip", f)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["frames"]["used"] == {"appearance": 2, "motion": 2}
    assert {c["label"] for c in body["top_k"]} <= {"people", "sport", *fs.class_names}
