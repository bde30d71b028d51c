"""The service end to end on a real store and trained runs: every real clip, concurrency,
similar videos, model selection, the index and serve commands, a real uvicorn server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from aggregator.similarity import IDS_FILE, INDEX_FILE, SimilarityIndex
from api.cli import main as cli_main
from api.service import Settings, create_app
from extractor.decode import frame_times
from tests.api.conftest import CLASSES, STORE_FRAMES, Served
from tests.conftest import real_video_paths


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    uploads = tmp_path_factory.mktemp("uploads")
    settings = Settings(
        runs=[served.gap, served.tp], store=served.store, upload_dir=uploads, workers=2
    )
    with TestClient(create_app(settings)) as c:
        yield c
    assert list(uploads.iterdir()) == []


def predict(client: TestClient, clip: Path, **params) -> dict:  # type: ignore[no-untyped-def]
    with clip.open("rb") as f:
        r = client.post("/v1/predict", params=params, files={"file": ("clip", f)})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def model_ids(client: TestClient) -> dict[str, dict]:
    return {m["head"]: m for m in client.get("/v1/models").json()["models"]}


def test_models_loaded_and_indexed(client: TestClient, served: Served) -> None:
    assert client.get("/readyz").json()["ready"] is True
    models = model_ids(client)
    assert set(models) == {"gap", "tp"}
    assert models["gap"]["default"] and not models["tp"]["default"]
    assert models["gap"]["classes"] == CLASSES
    assert models["gap"]["streams"] == ["appearance", "motion"]
    assert models["gap"]["beta"] is None
    beta = models["tp"]["beta"]["appearance"]
    assert [len(level) for level in beta] == [1, 2, 4]  # depth 3, level by level
    assert sum(map(sum, beta)) == pytest.approx(1.0, abs=1e-5)
    assert models["gap"]["similarity_index"] == len(served.train)
    # the index was built at start-up from the store and saved in the run directory
    for run in (served.gap, served.tp):
        assert (run / INDEX_FILE).is_file() and (run / IDS_FILE).is_file()
        assert sorted(json.loads((run / IDS_FILE).read_text())["video_ids"]) == sorted(served.train)


@pytest.mark.parametrize("clip", real_video_paths(), ids=lambda p: p.name)
def test_every_real_clip_predicts(client: TestClient, clip: Path) -> None:
    body = predict(client, clip, max_frames=2, top_k=5)
    probs = [c["probability"] for c in body["top_k"]]
    assert sorted(c["label"] for c in body["top_k"]) == CLASSES
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert body["frames"]["used"] == {"appearance": 2, "motion": 2}
    assert body["frames"]["n_frames"] >= 2
    # the times of the two frames used: the first and the last, as the decoder stamps them
    times = frame_times(clip).seconds
    assert body["frames"]["times"] == pytest.approx([times[0], times[-1]], abs=1e-9)
    assert body["video"]["width"] > 0 and body["video"]["height"] > 0
    assert body["model"] == model_ids(client)["gap"]["id"]


def test_concurrent_requests_get_their_own_answers(client: TestClient) -> None:
    names = ["mm_part_0.mp4", "vf_v_GGSY1Qvo990.mp4", "mm_test.avi", "mm_demo.mp4"]
    clips = [p for p in real_video_paths() if p.name in names]
    alone = {c.name: predict(client, c, max_frames=3, top_k=2) for c in clips}
    together: dict[str, dict] = {}

    def send(clip: Path) -> None:
        together[clip.name] = predict(client, clip, max_frames=3, top_k=2)

    threads = [threading.Thread(target=send, args=(c,)) for c in clips * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(together) == set(alone)
    for name, body in together.items():
        ref = alone[name]
        assert [c["label"] for c in body["top_k"]] == [c["label"] for c in ref["top_k"]]
        np.testing.assert_allclose(
            [c["probability"] for c in body["top_k"]],
            [c["probability"] for c in ref["top_k"]],
            atol=1e-4,
        )
        assert body["frames"] == ref["frames"] and body["video"] == ref["video"]
    # and the answers differ between clips, so a mix-up would have shown
    first = [alone[n]["top_k"][0]["probability"] for n in alone]
    assert len({round(p, 6) for p in first}) > 1


@pytest.mark.parametrize("head", ["gap", "tp"])
def test_similar_finds_a_training_video_itself_first(
    client: TestClient, served: Served, head: str
) -> None:
    run_id = model_ids(client)[head]["id"]
    labels = {
        "mm_part_0": "people",
        "mm_test": "sport",
        "left_then_right_000": "left_then_right",
    }
    for vid in labels:
        with served.clips[vid].open("rb") as f:
            r = client.post(
                "/v1/similar",
                params={"model": run_id, "max_frames": STORE_FRAMES, "top_k": 3},
                files={"file": ("clip", f)},
            )
        assert r.status_code == 200, r.text
        hits = r.json()["neighbours"]
        assert hits[0]["video_id"] == vid, hits
        assert hits[0]["distance"] < 0.01 < hits[1]["distance"] + 0.01
        assert hits[0]["label"] == labels[vid]
        # by id: the video itself is left out, the rest in the index's order of distance
        r = client.post("/v1/similar", params={"model": run_id, "video_id": vid, "top_k": 10})
        assert r.status_code == 200, r.text
        ids = [h["video_id"] for h in r.json()["neighbours"]]
        assert vid not in ids and sorted(ids) == sorted(set(served.train) - {vid})


def test_model_selection(client: TestClient, real_videos: list[Path]) -> None:
    clip = next(p for p in real_videos if p.name == "mm_part_0.mp4")
    tp = model_ids(client)["tp"]
    body = predict(client, clip, max_frames=4, model=tp["id"])
    assert body["model"] == tp["id"] and body["head"] == "tp"
    assert body["beta"] == tp["beta"]
    # the run directory's name and the head name the same run
    for name in ("run-tp", "tp"):
        assert predict(client, clip, max_frames=4, model=name)["model"] == tp["id"]
    r = client.post(
        "/v1/predict", params={"model": "run-xyz"}, files={"file": ("c", clip.read_bytes())}
    )
    assert r.status_code == 404 and tp["id"] in r.json()["detail"]


def test_index_command_rebuilds_the_same_index(served: Served, tmp_path: Path) -> None:
    before = SimilarityIndex.load(served.gap)
    code = cli_main(["index", "build", "--run", str(served.gap), "--store", str(served.store)])
    assert code == 0
    after = SimilarityIndex.load(served.gap)
    assert after.video_ids == before.video_ids and after.labels == before.labels
    for vid in after.video_ids:
        np.testing.assert_allclose(after.vector(vid), before.vector(vid), atol=1e-6)
    assert cli_main(["index", "build", "--run", str(tmp_path / "nope"), "--store", "x"]) == 2
    assert (
        cli_main(["index", "build", "--run", str(served.gap), "--store", "x", "--split", "zz"]) == 2
    )


def test_demo_request_over_real_http(served: Served, real_videos: list[Path]) -> None:
    from api.service.demo import demo_request

    clip = next(p for p in real_videos if p.name == "mm_part_0.mp4")
    out = demo_request(served.gap, clip, max_frames=4, top_k=2)
    assert out["status"] == 200, out
    assert out["response"]["frames"]["used"] == {"appearance": 4, "motion": 4}
    assert out["curl"].startswith("curl -s -F file=@") and "/v1/predict?top_k=2" in out["curl"]
    assert out["url"].startswith("http://127.0.0.1:")


def test_serve_command_rejects_bad_values(tmp_path: Path) -> None:
    assert cli_main(["serve", "--run", str(tmp_path / "missing")]) == 2
    assert cli_main(["serve", "--run", str(tmp_path), "--workers", "0"]) == 2
    assert cli_main(["serve", "--run", str(tmp_path), "--port", "70000"]) == 2


def test_bad_uploads_with_the_real_extractor(client: TestClient, real_videos: list[Path]) -> None:
    avi = next(p for p in real_videos if p.name == "mm_test.avi").read_bytes()
    mp4 = next(p for p in real_videos if p.name == "mm_part_0.mp4").read_bytes()
    for data, status in (
        (avi[: len(avi) // 2], 422),
        (mp4[:-2000], 422),
        (b"GIF89a not really", 415),
        (b"", 400),
    ):
        r = client.post("/v1/predict", params={"max_frames": 2}, files={"file": ("v", data)})
        assert r.status_code == status, r.text
        assert r.json()["detail"]
