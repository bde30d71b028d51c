"""HTTP behaviour of the service on a stand-in run (real decoding, tiny head): fast, no torch."""

from __future__ import annotations

import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.service import Settings, create_app
from tests.api.fakes import CLASSES, FakeExtractor, fake_loader


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


def make_client(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, extractor: FakeExtractor, **settings
) -> TestClient:
    monkeypatch.setattr("api.service.app._load", fake_loader(extractor))
    s = Settings(runs=[], upload_dir=uploads, **settings)
    return TestClient(create_app(s))


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, uploads: Path) -> Iterator[TestClient]:
    with make_client(monkeypatch, uploads, FakeExtractor(), max_upload_mb=1.0) as c:
        yield c
    assert list(uploads.iterdir()) == []


def post(client: TestClient, data: bytes, path: str = "/v1/predict", **params):  # type: ignore[no-untyped-def]
    return client.post(path, params=params, files={"file": ("clip.mp4", data, "video/mp4")})


def test_health_ready_models_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["workers"] == 1
    models = client.get("/v1/models").json()["models"]
    assert [m["id"] for m in models] == ["fake-run"]
    assert models[0]["classes"] == CLASSES and models[0]["default"] is True
    assert models[0]["similarity_index"] == 6
    assert models[0]["similarity_index_kind"]["kind"] == "flat"  # six videos: exact
    assert models[0]["similarity_index_kind"]["factory"] == "Flat"
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_predict_real_clip(client: TestClient, short_real_video: Path, uploads: Path) -> None:
    r = post(client, short_real_video.read_bytes(), top_k=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake-run" and len(body["top_k"]) == 2
    probs = [c["probability"] for c in body["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert body["frames"]["n_frames"] == 32 and body["frames"]["used"] == {"appearance": 32}
    assert body["video"]["width"] == 340 and body["video"]["height"] == 256
    assert set(body["timings"]) >= {"upload", "queue", "decode_extract", "head", "total"}
    # options as form fields; the answer does not depend on where they came from
    r2 = client.post(
        "/v1/predict",
        data={"top_k": "2", "max_frames": "4"},
        files={"file": ("x", short_real_video.read_bytes())},
    )
    assert r2.status_code == 200, r2.text
    assert r2.json()["frames"]["used"] == {"appearance": 4}
    assert list(uploads.iterdir()) == []


def test_an_option_in_query_and_form_takes_the_form_value(
    client: TestClient, short_real_video: Path
) -> None:
    r = client.post(
        "/v1/predict",
        params={"top_k": 2, "max_frames": 5},
        data={"top_k": "3"},
        files={"file": ("clip.mp4", short_real_video.read_bytes())},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["top_k"]) == 3 and r.json()["frames"]["used"] == {"appearance": 5}


@pytest.mark.parametrize(
    ("params", "data", "status", "words"),
    [
        ({"model": "nope"}, None, 404, "not loaded"),
        ({"top_k": 0}, None, 422, "top_k"),
        ({"max_frames": -3}, None, 422, "max_frames"),
        ({}, {"top_k": "3", "stride": "x"}, 422, "stride"),
        ({}, {"colour": "red"}, 422, "unknown form field"),
        ({}, {"model": "../../etc/passwd"}, 404, "not loaded"),
    ],
)
def test_bad_options(
    client: TestClient, short_real_video: Path, params, data, status: int, words: str
) -> None:
    r = client.post(
        "/v1/predict",
        params=params,
        data=data,
        files={"file": ("clip.mp4", short_real_video.read_bytes())},
    )
    assert r.status_code == status, r.text
    assert words in r.text


def _wav(path: Path) -> bytes:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000, dtype=np.int16).tobytes())
    return path.read_bytes()


def test_bad_uploads_get_4xx_and_leave_nothing(
    client: TestClient, real_videos: list[Path], tmp_path: Path, uploads: Path
) -> None:
    mp4 = next(p for p in real_videos if p.name == "mm_part_0.mp4").read_bytes()
    avi = next(p for p in real_videos if p.name == "mm_test.avi").read_bytes()
    cases = [
        (b"", 400, "empty"),
        (b"hello, I am not a video\n" * 40, 415, "not a supported video"),
        (_wav(tmp_path / "a.wav"), 415, "reads it as 'wav'"),  # audio only, not a video container
        (mp4[: len(mp4) // 3], 422, "cannot be decoded"),  # index (moov) cut off
        (avi[: len(avi) // 2], 422, "truncated"),  # frames cut off
        (b"\0" * (1024 * 1024 + 1), 413, "limit"),
    ]
    for data, status, words in cases:
        r = post(client, data)
        assert r.status_code == status, (status, r.text)
        assert words in r.json()["detail"], r.text
        assert str(uploads) not in r.text  # where uploads live is not disclosed
        assert list(uploads.iterdir()) == []
    # not multipart at all / no file part
    assert (
        client.post("/v1/predict", content=b"x", headers={"content-type": "video/mp4"}).status_code
        == 415
    )
    assert (
        client.post("/v1/predict", data={"top_k": "1"}, files={"other": ("a", b"1")}).status_code
        == 400
    )
    assert list(uploads.iterdir()) == []


def test_overload_answers_503_with_retry_after(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, short_real_video: Path
) -> None:
    gate = threading.Event()
    extractor = FakeExtractor(gate=gate)
    data = short_real_video.read_bytes()
    results: dict[str, int] = {}
    with make_client(monkeypatch, uploads, extractor, workers=1, queue_size=1) as client:
        queue = client.app.state.service.queue  # type: ignore[attr-defined]

        def send(name: str) -> None:
            results[name] = post(client, data).status_code

        first = threading.Thread(target=send, args=("running",))
        first.start()
        assert extractor.started.wait(30)
        second = threading.Thread(target=send, args=("waiting",))
        second.start()
        deadline = time.monotonic() + 30
        while queue.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.waiting == 1
        r = post(client, data)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["detail"]
        metrics = client.get("/metrics").text
        assert "framepool_queue_depth 1.0" in metrics
        assert "framepool_rejected_total 1.0" in metrics
        gate.set()
        first.join(30)
        second.join(30)
        assert results == {"running": 200, "waiting": 200}
    assert list(uploads.iterdir()) == []


def test_similar_by_id_and_errors(client: TestClient) -> None:
    r = client.post("/v1/similar", params={"video_id": "train2", "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "train2" and body["index_size"] == 6
    ids = [n["video_id"] for n in body["neighbours"]]
    assert len(ids) == 3 and "train2" not in ids
    d = [n["distance"] for n in body["neighbours"]]
    assert d == sorted(d)
    assert client.post("/v1/similar", params={"video_id": "nope"}).status_code == 404
    assert client.post("/v1/similar").status_code == 422


def test_similar_upload(client: TestClient, short_real_video: Path) -> None:
    r = post(client, short_real_video.read_bytes(), path="/v1/similar", top_k=6)
    assert r.status_code == 200, r.text
    assert len(r.json()["neighbours"]) == 6 and r.json()["query"] == "upload"


def test_metrics_count_requests_by_route(client: TestClient, short_real_video: Path) -> None:
    client.get("/healthz")
    client.get("/no/such/path")
    post(client, short_real_video.read_bytes())
    text = client.get("/metrics").text
    assert 'framepool_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert 'framepool_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    assert 'framepool_request_duration_seconds_count{method="POST",route="/v1/predict"} 1.0' in text
    assert "framepool_requests_in_flight" in text
    assert 'framepool_stage_duration_seconds_count{stage="decode_extract"} 1.0' in text


def test_frame_limit_and_defaults(
    monkeypatch: pytest.MonkeyPatch, uploads: Path, short_real_video: Path
) -> None:
    data = short_real_video.read_bytes()
    with make_client(
        monkeypatch, uploads, FakeExtractor(), max_frames_limit=5, default_stride=2
    ) as client:
        r = post(client, data, max_frames=10)
        assert r.status_code == 422 and "limit of 5" in r.text
        body = post(client, data).json()
        assert body["frames"] == {
            "n_frames": 32,
            "used": {"appearance": 5},
            "stride": 2,
            "max_frames": 5,
            "times": None,  # the fake extractor measures none
        }
        assert post(client, data, max_frames=3, stride=1).json()["frames"]["used"] == {
            "appearance": 3
        }


def test_a_run_without_index_is_a_404_that_names_the_fix() -> None:
    from types import SimpleNamespace

    from fastapi import HTTPException

    from api.service.deps import require_index

    run = SimpleNamespace(run_id="run-x", index=None)
    with pytest.raises(HTTPException) as err:
        require_index(run, "similar=3")  # type: ignore[arg-type]
    assert err.value.status_code == 404
    assert "'run-x' has no similarity index for similar=3" in str(err.value.detail)
    assert "framepool index build --run DIR --store PATH" in str(err.value.detail)
    index = object()
    assert require_index(SimpleNamespace(run_id="run-y", index=index)) is index  # type: ignore[arg-type]
