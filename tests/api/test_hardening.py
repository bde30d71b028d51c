"""The service against hostile and unlucky clients: files that are not videos, videos that cost
far more than their size, clients that stall or hang up, and many uploads at once."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.service import Settings, create_app
from tests.api.conftest import Served
from tests.api.fakes import FakeExtractor, fake_loader
from tests.api.live import LiveServer, multipart_request, read_response, wait_for
from tests.extractor.conftest import write_clip

LONG = 3000  # frames of the long tiny-frame video


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3,000 frames of 16x16 (a few tens of KB): once in an MP4, which declares its frame count,
    once in Matroska, which does not (the frames must be counted)."""
    d = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(LONG, 16, 16, 3), dtype=np.uint8)
    return {
        "mp4": write_clip(d / "long.mp4", frames, codec="mpeg4"),
        "mkv": write_clip(d / "long.mkv", frames, codec="mpeg4"),
    }


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


def fake_app(
    monkeypatch: pytest.MonkeyPatch,
    uploads: Path,
    extractor: FakeExtractor | None = None,
    **settings: object,
):  # type: ignore[no-untyped-def]
    monkeypatch.setattr("api.service.app._load", fake_loader(extractor or FakeExtractor()))
    return create_app(Settings(runs=[], upload_dir=uploads, **settings))  # type: ignore[arg-type]


def post(client: TestClient, data: bytes, **params: object):  # type: ignore[no-untyped-def]
    return client.post("/v1/predict", params=params, files={"file": ("clip.mp4", data)})


# ------------------------------------------------------------------------------ not a video
def test_a_png_and_a_playlist_named_mp4_get_415(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, tmp_path: Path, short_real_video: Path
) -> None:
    png = tmp_path / "still.png"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(png)
    with TestClient(fake_app(monkeypatch, uploads)) as client:
        # another upload in the same folder is what a relative playlist entry would reach
        beside = uploads / "upload-someone-else.bin"
        shutil.copy(short_real_video, beside)
        playlist = f"ffconcat version 1.0\nfile {beside.name}\n".encode()
        for data, words in ((png.read_bytes(), "png_pipe"), (playlist, "concat playlist")):
            for path in ("/v1/predict", "/v1/similar"):
                r = client.post(path, files={"file": ("clip.mp4", data, "video/mp4")})
                assert r.status_code == 415, r.text
                assert words in r.json()["detail"] and "accepted: mp4/mov" in r.json()["detail"]
                assert str(uploads) not in r.text
        beside.unlink()
        assert post(client, short_real_video.read_bytes()).status_code == 200
    assert list(uploads.iterdir()) == []


# ------------------------------------------------------------------------------ bounded work
def test_a_long_tiny_frame_video_is_subsampled_to_the_frame_limit(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, long_tiny: dict[str, Path]
) -> None:
    with TestClient(fake_app(monkeypatch, uploads, max_frames_limit=8)) as client:
        for kind, clip in long_tiny.items():
            r = post(client, clip.read_bytes())
            assert r.status_code == 200, (kind, r.text)
            frames = r.json()["frames"]
            assert frames["n_frames"] == LONG and frames["used"] == {"appearance": 8}, kind
            assert frames["max_frames"] == 8
        r = post(client, long_tiny["mp4"].read_bytes(), max_frames=9)
        assert r.status_code == 422 and "limit of 8" in r.json()["detail"]
    assert list(uploads.iterdir()) == []


def test_a_video_over_the_decoded_frame_limit_gets_413(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, long_tiny: dict[str, Path]
) -> None:
    extractor = FakeExtractor()
    app = fake_app(monkeypatch, uploads, extractor, max_decoded_frames=1000)
    with TestClient(app) as client:
        declared = post(client, long_tiny["mp4"].read_bytes())  # refused from the container
        assert declared.status_code == 413, declared.text
        assert "declares 3000 frames" in declared.json()["detail"]
        assert "limit of 1000 frames" in declared.json()["detail"]
        assert not extractor.started.is_set()  # never reached a worker
        counted = post(client, long_tiny["mkv"].read_bytes())  # refused by the demuxer's count
        assert counted.status_code == 413, counted.text
        assert "3000 frames, more than the limit of 1000 frames" in counted.json()["detail"]
        assert not extractor.started.is_set()  # before decoding
    assert list(uploads.iterdir()) == []


def test_frames_over_the_pixel_limit_get_413(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, short_real_video: Path
) -> None:
    with TestClient(fake_app(monkeypatch, uploads, max_frame_pixels=50_000)) as client:
        r = post(client, short_real_video.read_bytes())
        assert r.status_code == 413, r.text
        assert "340x256 = 87040 pixels" in r.json()["detail"] and "50000" in r.json()["detail"]
        limits = client.get("/v1/limits").json()
        assert limits["max_frame_pixels"] == 50_000 and limits["max_frames"] == 300
    assert list(uploads.iterdir()) == []


def test_a_job_over_the_time_limit_is_stopped_and_the_worker_freed(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, short_real_video: Path
) -> None:
    gate = threading.Event()  # the job hangs at its first frame until the gate opens
    extractor = FakeExtractor(gate=gate)
    # long enough for the follow-up request's real decode on a loaded machine
    app = fake_app(monkeypatch, uploads, extractor, job_timeout_s=5, workers=1)
    with TestClient(app) as client:
        r = post(client, short_real_video.read_bytes())
        assert r.status_code == 503, r.text
        assert "limit of 5 s per video" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        assert extractor.stopped.is_set()
        gate.set()
        assert post(client, short_real_video.read_bytes()).status_code == 200
    assert list(uploads.iterdir()) == []


def test_limits_are_published(monkeypatch: pytest.MonkeyPatch, uploads: Path) -> None:
    app = fake_app(monkeypatch, uploads, max_upload_mb=2.0, upload_budget_mb=8.0, job_timeout_s=9)
    with TestClient(app) as client:
        limits = client.get("/v1/limits").json()
    assert limits["max_upload_bytes"] == 2 * 2**20
    assert limits["upload_budget_bytes"] == 8 * 2**20 and limits["upload_budget_used_bytes"] == 0
    assert limits["job_timeout_s"] == 9 and limits["max_decoded_frames"] == 18_000
    assert limits["workers"] == 1 and limits["queue_size"] == 8


# ------------------------------------------------------------------------------ a real server
@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO):
        yield caplog
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]  # no tracebacks for expected events


def test_a_client_gone_while_its_job_runs_stops_the_job(
    monkeypatch: pytest.MonkeyPatch,
    uploads: Path,
    short_real_video: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()
    extractor = FakeExtractor(gate=gate)
    app = fake_app(monkeypatch, uploads, extractor, workers=1)
    head, body = multipart_request("/v1/predict", short_real_video.read_bytes())
    with LiveServer(app) as server:
        queue = app.state.service.queue
        sock = server.connect()
        sock.sendall(head + body)
        assert extractor.started.wait(30)
        sock.close()  # the client gives up while its job runs
        wait_for(extractor.stopped.is_set, 30, "the job to stop")
        wait_for(lambda: queue.running == 0, 30, "the worker to be free")
        wait_for(lambda: list(uploads.iterdir()) == [], 30, "the upload to be removed")
        gate.set()
        sock = server.connect()
        sock.sendall(head + body)
        status, _, answer = read_response(sock)
        assert status == 200, answer
    messages = [r.getMessage() for r in logs.records]
    assert any("client went away; its job was stopped" in m for m in messages)
    gone = [m for m in messages if m.startswith("POST /v1/predict 499")]
    assert gone and "(client went away)" in gone[0]
    ok = [m for m in messages if m.startswith("POST /v1/predict 200")]
    assert ok and "model=fake-run" in ok[0] and f"in={len(body)}" in ok[0]


def test_an_upload_abandoned_mid_body_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
    uploads: Path,
    short_real_video: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    extractor = FakeExtractor()
    app = fake_app(monkeypatch, uploads, extractor)
    head, body = multipart_request("/v1/predict", short_real_video.read_bytes())
    with LiveServer(app) as server:
        sock = server.connect()
        sock.sendall(head + body[: len(body) // 2])
        wait_for(lambda: len(list(uploads.iterdir())) == 1, 30, "the upload to start")
        sock.close()
        wait_for(lambda: list(uploads.iterdir()) == [], 30, "the upload to be removed")
        wait_for(lambda: app.state.service.uploads.used == 0, 30, "the budget to be released")
    assert not extractor.started.is_set()
    assert any("went away during an upload" in r.getMessage() for r in logs.records)


def test_a_stalled_upload_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
    uploads: Path,
    short_real_video: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    app = fake_app(monkeypatch, uploads, upload_idle_timeout_s=0.3)
    head, body = multipart_request("/v1/predict", short_real_video.read_bytes())
    with LiveServer(app) as server:
        sock = server.connect()
        sock.sendall(head + body[:1000])  # and then nothing
        status, _, answer = read_response(sock)
        assert status == 408 and b"sent nothing for 0.3 s" in answer
        wait_for(lambda: list(uploads.iterdir()) == [], 30, "the upload to be removed")


def test_uploads_over_the_disk_budget_get_503(
    monkeypatch: pytest.MonkeyPatch,
    uploads: Path,
    short_real_video: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    video = short_real_video.read_bytes()  # 155 KiB
    app = fake_app(monkeypatch, uploads, upload_budget_mb=0.2, retry_after_s=3)
    head, body = multipart_request("/v1/predict", video)
    with LiveServer(app) as server:
        budget = app.state.service.uploads
        held = server.connect()  # an upload held part-way, 100 KB on disk
        held.sendall(head + body[:100_000])
        wait_for(lambda: budget.used >= 99_000, 30, "the first upload's bytes")
        refused = server.connect()
        refused.sendall(head)  # its declared length does not fit: refused before its body
        status, headers, answer = read_response(refused)
        assert status == 503 and headers["retry-after"] == "3", answer
        assert b"retry later" in answer
        assert len(list(uploads.iterdir())) == 1
        held.sendall(body[100_000:])  # the held one completes and is answered
        status, _, answer = read_response(held)
        assert status == 200, answer
        wait_for(lambda: budget.used == 0, 30, "the budget to be released")
        again = server.connect()
        again.sendall(head + body)
        assert read_response(again)[0] == 200
    assert list(uploads.iterdir()) == []


# ------------------------------------------------------------------------------ real extractor
def test_limits_with_the_real_extractor(
    served: Served, tmp_path: Path, long_tiny: dict[str, Path]
) -> None:
    settings = Settings(runs=[served.tp], upload_dir=tmp_path / "up", max_frames_limit=6, workers=1)
    with TestClient(create_app(settings)) as client:
        r = post(client, long_tiny["mkv"].read_bytes())
        assert r.status_code == 200, r.text
        frames = r.json()["frames"]
        assert frames["n_frames"] == LONG and frames["used"] == {"appearance": 6, "motion": 6}
    settings = Settings(runs=[served.tp], upload_dir=tmp_path / "up", job_timeout_s=1e-4)
    with TestClient(create_app(settings)) as client:
        r = post(client, long_tiny["mkv"].read_bytes())
        assert r.status_code == 503 and "limit of 0.0001 s" in r.json()["detail"]
    assert list((tmp_path / "up").iterdir()) == []


# ------------------------------------------------------------------------------ schema agreement
def test_the_schema_says_what_the_service_takes(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, short_real_video: Path
) -> None:
    with TestClient(fake_app(monkeypatch, uploads)) as client:
        schema = client.get("/openapi.json").json()
        predict = schema["paths"]["/v1/predict"]["post"]
        model = next(p for p in predict["parameters"] if p["name"] == "model")
        # the loaded run's id, its directory's name and its head
        assert model["schema"]["enum"] == ["fake-run", "nonexistent", "gap"]
        body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert body["required"] == ["file"] and body["additionalProperties"] is False
        assert set(schema["paths"]["/v1/similar"]) == {"get", "post"}
        # by id: GET; POST with a video_id (query or form) searches by id too, file unused
        by_get = client.get("/v1/similar", params={"video_id": "train2", "top_k": 3})
        assert by_get.status_code == 200 and by_get.json()["query"] == "train2"
        video = short_real_video.read_bytes()
        for params, data in (({"video_id": "train2"}, None), ({}, {"video_id": "train2"})):
            r = client.post("/v1/similar", params={**params, "top_k": 3}, data=data,
                            files={"file": ("clip.mp4", video)})  # fmt: skip
            assert r.status_code == 200 and r.json()["neighbours"] == by_get.json()["neighbours"]
        r = client.request("OPTIONS", "/v1/similar")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
        r = client.delete("/v1/limits")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert list(uploads.iterdir()) == []


def test_docs_need_no_network(monkeypatch: pytest.MonkeyPatch, uploads: Path) -> None:
    with TestClient(fake_app(monkeypatch, uploads)) as client:
        for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            html = client.get(page)
            assert html.status_code == 200 and f"/docs-static/{asset}" in html.text
            assert "cdn." not in html.text and "fonts.googleapis" not in html.text
            js = client.get(f"/docs-static/{asset}")
            assert js.status_code == 200 and len(js.content) > 100_000
        assert client.get("/docs-static/swagger-ui.css").status_code == 200
        assert "/docs-static/swagger-ui.css" in client.get("/docs").text


def test_predict_can_return_the_nearest_training_videos(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, short_real_video: Path
) -> None:
    video = short_real_video.read_bytes()
    with TestClient(fake_app(monkeypatch, uploads)) as client:
        r = post(client, video, similar=3, max_frames=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["similar"]) == 3 and body["frames"]["used"] == {"appearance": 5}
        assert [n["distance"] for n in body["similar"]] == sorted(
            n["distance"] for n in body["similar"]
        )
        alone = client.post("/v1/similar", params={"top_k": 3, "max_frames": 5},
                            files={"file": ("clip.mp4", video)})  # fmt: skip
        assert body["similar"] == alone.json()["neighbours"]  # one extraction, the same answer
        assert post(client, video).json()["similar"] is None
        assert post(client, video, similar=0).status_code == 422
    assert list(uploads.iterdir()) == []
