"""The batcher in front of each model: concurrent uploads share a forward pass, and each answer
is the one its upload gets alone."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.service import Settings, create_app
from api.service.batching import BatcherClosed, FrameBatcher, Pass
from tests.api.conftest import Served
from tests.conftest import real_video_paths


def doubled(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stand-in model whose output row i depends on input row i only."""
    return {s: 2 * x.reshape(len(x), -1).sum(1, keepdims=True) for s, x in batch.items()}


def call_together(batcher: FrameBatcher, batches: list[dict[str, np.ndarray]]) -> list[Any]:
    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(batcher.embed, batches))


def test_every_caller_gets_its_own_rows_from_one_pass() -> None:
    batcher = FrameBatcher(doubled, max_frames=100, max_wait_s=30, workers=3)
    try:
        batches = [
            {"appearance": np.full((n, 2), k, np.float32), "motion": np.full((n, 3), -k, np.int64)}
            for k, n in ((1, 4), (2, 1), (3, 7))
        ]
        outs = call_together(batcher, batches)  # all three workers in: no waiting 30 s
        for batch, out in zip(batches, outs, strict=True):
            assert set(out) == {"appearance", "motion"}
            for s in out:
                assert np.array_equal(out[s], doubled(batch)[s])
        assert list(batcher.passes) == [Pass(batches=3, frames=12)]
    finally:
        batcher.close()


def test_a_full_batch_runs_without_waiting_and_is_never_split() -> None:
    batcher = FrameBatcher(doubled, max_frames=8, max_wait_s=30, workers=10)
    try:
        batches = [{"appearance": np.full((n, 1), n, np.float32)} for n in (5, 5, 12)]
        outs = call_together(batcher, batches)
        for batch, out in zip(batches, outs, strict=True):
            assert np.array_equal(out["appearance"], doubled(batch)["appearance"])
        # 5 + 5 > 8 and 12 > 8: each alone, and none waited for the 30 s (a full pass is due)
        assert sorted(p.frames for p in batcher.passes) == [5, 5, 12]
    finally:
        batcher.close()


def test_an_error_reaches_every_caller_of_the_pass_and_close_releases_waiters() -> None:
    def broken(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("model failed")

    batcher = FrameBatcher(broken, max_frames=64, max_wait_s=0.0, workers=2)
    with pytest.raises(RuntimeError, match="model failed"):
        batcher.embed({"appearance": np.zeros((2, 1))})
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.embed({"appearance": np.zeros((2, 1))})
    with pytest.raises(ValueError, match="same number of rows"):
        FrameBatcher(doubled, max_frames=4, max_wait_s=0, workers=1).embed(
            {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}
        )


def test_a_lone_caller_waits_at_most_max_wait() -> None:
    batcher = FrameBatcher(doubled, max_frames=64, max_wait_s=0.05, workers=4)
    try:
        done = threading.Event()
        out: list[Any] = []
        thread = threading.Thread(
            target=lambda: (out.append(batcher.embed({"a": np.ones((3, 1))})), done.set())
        )
        thread.start()
        assert done.wait(30)  # ran although three other workers never came
        assert out[0]["a"].tolist() == [[2.0], [2.0], [2.0]]
    finally:
        batcher.close()


def _predict(client: TestClient, clip: Path) -> dict[str, Any]:
    with clip.open("rb") as f:
        r = client.post(
            "/v1/predict", params={"max_frames": 8, "top_k": 4}, files={"file": ("clip", f)}
        )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _proba(body: dict[str, Any]) -> dict[str, float]:
    return {c["label"]: c["probability"] for c in body["top_k"]}


def test_two_concurrent_requests_share_a_forward_pass(served: Served, tmp_path: Path) -> None:
    clips = [p for p in real_video_paths() if p.name in ("mm_part_0.mp4", "mm_test.avi")]
    common = {"runs": [served.gap], "upload_dir": tmp_path / "uploads", "workers": 2}
    with TestClient(create_app(Settings(**common, batch_max_frames=0))) as client:
        alone = [_predict(client, c) for c in clips]  # no batcher: each upload its own passes
    # a pass is due at 16 frames (both 8-frame uploads) or after 10 s: they must share it
    settings = Settings(**common, batch_max_frames=16, batch_max_wait_s=10)
    with TestClient(create_app(settings)) as client:
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda c: _predict(client, c), clips))
        (batcher,) = client.app.state.service.context.batchers.values()  # type: ignore[attr-defined]
        assert list(batcher.passes) == [Pass(batches=2, frames=16)]
        metrics = client.get("/metrics").text
        assert "framepool_batch_pass_frames_sum 16.0" in metrics
        assert "framepool_batch_pass_uploads_sum 2.0" in metrics
        assert "framepool_batch_wait_seconds_count 2.0" in metrics
    for a, t in zip(alone, together, strict=True):
        assert t["frames"] == a["frames"]
        pa, pt = _proba(a), _proba(t)
        assert pa.keys() == pt.keys()
        for label in pa:
            assert pt[label] == pytest.approx(pa[label], abs=1e-5)
    assert _proba(together[0]) != pytest.approx(_proba(together[1]), abs=1e-3)  # not mixed up
