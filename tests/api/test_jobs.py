"""Jobs for long videos: created, polled, finished, fetched and cancelled; bounded; their own
limits; and no file left behind by a stop or a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.service import Settings, create_app
from tests.api.conftest import Served
from tests.api.fakes import FakeExtractor, fake_loader
from tests.conftest import real_clip


def fake_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, extractor: FakeExtractor, **settings: Any
):  # type: ignore[no-untyped-def]
    monkeypatch.setattr("api.service.app._load", fake_loader(extractor))
    return create_app(
        Settings(runs=[], upload_dir=tmp_path / "uploads", jobs_dir=tmp_path / "jobs", **settings)
    )


def post_job(client: TestClient, clip: Path, **params: Any):  # type: ignore[no-untyped-def]
    with clip.open("rb") as f:
        return client.post("/v1/jobs", params=params, files={"file": ("clip.mp4", f)})


def wait_until(client: TestClient, url: str, done: tuple[str, ...]) -> dict[str, Any]:
    for _ in range(600):
        body: dict[str, Any] = client.get(url).json()
        if body["status"] in done:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{url} still {body['status']} after 30 s")


def test_a_job_is_created_polled_finished_fetched_and_cancelled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gate = threading.Event()
    extractor = FakeExtractor(gate=gate)
    clip = real_clip("mm_part_0.mp4")
    app = fake_app(monkeypatch, tmp_path, extractor, jobs_max=1, max_frames_limit=5)
    with TestClient(app) as client:
        # created: 202, its URL in Location; frames above the requests' limit are allowed
        r = post_job(client, clip, max_frames=20, top_k=2)
        assert r.status_code == 202, r.text
        url = r.headers["location"]
        job = r.json()
        assert url == f"/v1/jobs/{job['id']}" and job["status"] in ("queued", "running")
        assert job["progress"]["frames_total"] == 32 and job["result"] is None
        # polled while it runs (held at its first frame); one more job is one too many
        assert extractor.started.wait(30)
        assert client.get(url).json()["status"] == "running"
        busy = post_job(client, clip)
        assert busy.status_code == 503 and "retry-after" in busy.headers
        assert len(list((tmp_path / "jobs").iterdir())) == 1  # the running job's upload
        # finished and fetched
        gate.set()
        done = wait_until(client, url, ("succeeded", "failed", "cancelled"))
        assert done["status"] == "succeeded", done
        assert done["progress"]["fraction"] == 1.0 and done["expires_at"] is not None
        result = done["result"]
        assert result["frames"]["n_frames"] == 32 and result["frames"]["max_frames"] == 20
        assert result["frames"]["used"] == {"appearance": 20}
        assert len(result["top_k"]) == 2 and result["model"] == "fake-run"
        assert list((tmp_path / "jobs").iterdir()) == []  # its upload went with its end
        # a finished job is forgotten on DELETE
        assert client.delete(url).json()["status"] == "succeeded"
        assert client.get(url).status_code == 404
        # cancelled while it runs: it stops at its next frame and its upload goes
        gate.clear()
        extractor.started.clear()
        r = post_job(client, clip)
        assert r.status_code == 202, r.text
        url = r.headers["location"]
        assert extractor.started.wait(30)
        cancelled = client.delete(url)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert extractor.stopped.wait(30)
        assert client.get(url).status_code == 404 and client.delete(url).status_code == 404
        for _ in range(600):  # the upload is removed once the worker has let go of it
            if not list((tmp_path / "jobs").iterdir()):
                break
            time.sleep(0.05)
        assert list((tmp_path / "jobs").iterdir()) == []
        # the job pool is free again: a new job is taken
        gate.set()
        r = post_job(client, clip, max_frames=3)
        assert r.status_code == 202, r.text
        assert wait_until(client, r.headers["location"], ("succeeded",))["status"] == "succeeded"


def test_job_limits_and_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clip = real_clip("mm_part_0.mp4")
    app = fake_app(
        monkeypatch,
        tmp_path,
        FakeExtractor(),
        jobs_max_frames_limit=10,
        jobs_max_decoded_frames=20,
        max_decoded_frames=10,
    )
    with TestClient(app) as client:
        too_many = post_job(client, clip, max_frames=11)
        assert too_many.status_code == 422 and "limit of 10" in too_many.json()["detail"]
        too_long = post_job(client, clip)
        assert too_long.status_code == 413 and "limit of 20 frames" in too_long.json()["detail"]
        not_video = client.post("/v1/jobs", files={"file": ("x.mp4", b"not a video at all")})
        assert not_video.status_code == 415, not_video.text
        assert client.get("/v1/jobs/0123abcd").status_code == 404
        assert client.get("/v1/jobs/not-hex").status_code == 422
        allow = client.patch("/v1/jobs/0123abcd")
        assert allow.status_code == 405 and allow.headers["allow"] == "DELETE, GET"
    assert list((tmp_path / "jobs").iterdir()) == []


def test_a_restart_leaves_no_job_file_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clip = real_clip("mm_part_0.mp4")
    gate = threading.Event()  # never opened: the jobs are running or queued at shutdown
    extractor = FakeExtractor(gate=gate)
    jobs_dir = tmp_path / "jobs"
    with TestClient(fake_app(monkeypatch, tmp_path, extractor)) as client:
        urls = [post_job(client, clip).headers["location"] for _ in range(2)]
        assert extractor.started.wait(30)
        assert len(list(jobs_dir.iterdir())) == 2  # one running, one queued
    assert extractor.stopped.is_set()  # the running one was stopped
    assert list(jobs_dir.iterdir()) == []
    # a service killed mid-job leaves its upload: the next one over the same folder removes it
    (jobs_dir / "upload-left.bin").write_bytes(clip.read_bytes())
    with TestClient(fake_app(monkeypatch, tmp_path, FakeExtractor())) as client:
        assert list(jobs_dir.iterdir()) == []
        assert all(client.get(url).status_code == 404 for url in urls)  # jobs live in memory


def test_a_job_answers_as_predict_does_on_a_real_run(served: Served, tmp_path: Path) -> None:
    clip = real_clip("vf_v_GGSY1Qvo990.mp4")
    settings = Settings(runs=[served.tp], upload_dir=tmp_path / "up", jobs_dir=tmp_path / "jobs")
    with TestClient(create_app(settings)) as client:
        with clip.open("rb") as f:
            sync = client.post("/v1/predict", params={"max_frames": 4}, files={"file": f})
        assert sync.status_code == 200, sync.text
        r = post_job(client, clip, max_frames=4)
        assert r.status_code == 202, r.text
        job = wait_until(client, r.headers["location"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["frames_total"] == job["result"]["frames"]["n_frames"] == 355
    got = {c["label"]: c["probability"] for c in job["result"]["top_k"]}
    want = {c["label"]: c["probability"] for c in sync.json()["top_k"]}
    assert got == pytest.approx(want, abs=1e-6)
    assert job["result"]["beta"] == sync.json()["beta"]
    assert list((tmp_path / "jobs").iterdir()) == []
