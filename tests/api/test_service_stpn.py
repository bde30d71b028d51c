"""Serving an ``stpn`` run: the upload's maps are computed on the fly and give the same class
probabilities as the run evaluated on the store's map streams; similar videos by its embedding."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from aggregator.maps.data import MapDataset
from aggregator.maps.predict import MapRun
from aggregator.run_loader import load_run
from api.cli import main as cli_main
from api.service import Settings, create_app
from storage import FeatureStore
from tests.api.browser import chromium, screenshot_dir
from tests.api.live import LiveServer
from tests.conftest import real_video_paths

CLIPS = {
    "mm_part_0.mp4": ("people", "train"),
    "mm_demo.mp4": ("people", "train"),
    "mm_test.avi": ("sport", "train"),
    "vf_v_GGSY1Qvo990.mp4": ("sport", "train"),
    "mm_demo_spatiotemporal_det.mp4": ("people", "test"),
}
FRAMES = 4


@dataclass
class StpnServed:
    store: Path
    run: Path


@pytest.fixture(scope="module")
def stpn_served(tmp_path_factory: pytest.TempPathFactory) -> StpnServed:
    root = tmp_path_factory.mktemp("stpn")
    paths = {p.name: p for p in real_video_paths()}
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows((str(paths[n]), label, split) for n, (label, split) in CLIPS.items())
    store, run = root / "store.zarr", root / "run"
    extract = ["extract", *(str(paths[n]) for n in CLIPS), "--store", str(store)]
    extract += ["--labels", str(labels), "--arch", "resnet18", "--weights", "random"]
    extract += ["--streams", "appearance,motion,appearance_map,motion_map", "--map-dim", "8"]
    extract += ["--map-stride", "2", "--max-frames", str(FRAMES), "--device", "cpu"]
    assert cli_main([*extract, "--no-progress"]) == 0
    train = ["train", "--store", str(store), "--head", "stpn", "--out", str(run), "--no-plots"]
    train += ["--epochs", "2", "--batch-size", "2", "--out-dim", "32", "--val-fraction", "0"]
    assert cli_main([*train, "--device", "cpu"]) == 0
    return StpnServed(store, run)


@pytest.fixture(scope="module")
def client(
    stpn_served: StpnServed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    settings = Settings(
        runs=[stpn_served.run],
        store=stpn_served.store,
        upload_dir=tmp_path_factory.mktemp("uploads"),
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _post(client: TestClient, clip: Path, **params: object) -> dict:  # type: ignore[type-arg]
    with clip.open("rb") as f:
        r = client.post("/v1/predict", params=params, files={"file": ("clip", f)})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["mm_demo_spatiotemporal_det.mp4", "mm_part_0.mp4"])
def test_upload_gives_the_probabilities_of_the_stored_maps(
    client: TestClient, stpn_served: StpnServed, name: str
) -> None:
    clip = next(p for p in real_video_paths() if p.name == name)
    body = _post(client, clip, max_frames=FRAMES, top_k=2)
    assert body["head"] == "stpn" and body["beta"] is None
    assert body["frames"]["used"] == {"appearance_map": 2, "motion_map": 2}  # stride 2 of 4
    got = {c["label"]: c["probability"] for c in body["top_k"]}

    run = load_run(stpn_served.run)
    assert isinstance(run, MapRun)
    store = FeatureStore.open(stpn_served.store)
    logits = run.logits_of(MapDataset(store, [clip.stem], run.streams))  # as evaluate reads it
    want = torch.softmax(torch.from_numpy(logits[0]).double(), 0).numpy()
    for label, p in got.items():
        assert p == pytest.approx(float(want[run.class_names.index(label)]), abs=1e-6)


def test_models_and_similar_videos(client: TestClient) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [m["head"] for m in models] == ["stpn"]
    assert models[0]["streams"] == ["appearance_map", "motion_map"]
    assert models[0]["similarity_index"] == 4  # the train split, embedded from the store's maps
    clip = next(p for p in real_video_paths() if p.name == "mm_test.avi")
    body = _post(client, clip, max_frames=FRAMES, similar=2)
    nearest = body["similar"][0]
    assert nearest["video_id"] == clip.stem and nearest["label"] == "sport"
    assert nearest["distance"] == pytest.approx(0.0, abs=1e-5)
    assert np.isfinite(body["similar"][1]["distance"])


def test_attention_of_an_upload_is_that_of_the_stored_maps(
    client: TestClient, stpn_served: StpnServed
) -> None:
    clip = next(p for p in real_video_paths() if p.name == "mm_part_0.mp4")
    with clip.open("rb") as f:
        r = client.post(
            "/v1/attention", params={"max_frames": FRAMES}, files={"file": (clip.name, f)}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["head"] == "stpn" and body["n_frames"] == 32
    # 4 frames used of 32 (0, 10, 21, 31), maps at every 2nd of them
    assert body["frames"] == [0, 21]
    got = np.asarray(body["weights"])
    assert got.shape[0] == 2 and got.ndim == 3
    np.testing.assert_allclose(got.sum(axis=(1, 2)), 1.0, atol=1e-5)

    run = load_run(stpn_served.run)
    assert isinstance(run, MapRun)
    store = FeatureStore.open(stpn_served.store)
    want = run.attention({s: store.read(clip.stem, s) for s in run.streams})
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_page_shows_where_the_head_attends(
    stpn_served: StpnServed, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """In chromium: the page draws one attention grid per map frame and names its heaviest
    cell, as the service's /v1/attention answers for the same upload."""
    settings = Settings(
        runs=[stpn_served.run],
        store=stpn_served.store,
        upload_dir=tmp_path_factory.mktemp("page-uploads"),
    )
    clip = next(p for p in real_video_paths() if p.name == "mm_part_0.mp4")
    with chromium() as browser, LiveServer(create_app(settings)) as server:
        url = f"http://127.0.0.1:{server.port}"
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#model option", state="attached")
        page.set_input_files("#file", str(clip))
        page.fill("#max_frames", str(FRAMES))
        page.click("#go")
        page.wait_for_selector(".attn", timeout=90_000)
        captions = page.locator(".attn figcaption").all_inner_texts()
        scale = page.inner_text("#attention-scale")
        page.locator("#attention").screenshot(
            path=str(screenshot_dir(tmp_path_factory) / "page-attention.png")
        )
        with clip.open("rb") as f:
            body = httpx.post(
                url + "/v1/attention",
                params={"max_frames": FRAMES},
                files={"file": (clip.name, f)},
                timeout=120,
            ).json()
        page.close()
    weights = np.asarray(body["weights"])
    assert f"{weights.min():.3f}, to the darkest, {weights.max():.3f}" in scale
    assert len(captions) == len(body["frames"]) == 2
    for caption, frame, grid in zip(captions, body["frames"], weights, strict=True):
        y, x = np.unravel_index(np.argmax(grid), grid.shape)
        assert caption == (
            f"frame {frame}: heaviest row {y + 1}, column {x + 1} ({grid[y, x]:.3f})"
        )
    assert page.is_closed()
