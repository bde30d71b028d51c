"""One decode per upload: the decoder is opened once per request on every real clip, with and
without a frame limit, and the frames the demuxer's count selects are the decoded count's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import extractor.decode as decode
from api.service import Settings, create_app
from extractor.decode import count_frames, count_packets
from extractor.prepare import FrameChunk, FrameCountChanged, VideoDone, prepare_video
from tests.api.conftest import Served
from tests.conftest import real_video_paths


class DecodeCounter:
    """Counts the decoder's opens: every decoding pass of ``extractor.decode`` starts in
    ``_decode`` (the real one runs; only the calls are counted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opens: list[Path] = []
        real = decode._decode

        def counted(path: Path, threads: bool) -> Iterator[Any]:
            self.opens.append(Path(path))
            return real(path, threads)

        monkeypatch.setattr(decode, "_decode", counted)


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    uploads = tmp_path_factory.mktemp("uploads")
    settings = Settings(runs=[served.gap], upload_dir=uploads, max_frames_limit=None)
    with TestClient(create_app(settings)) as c:
        yield c
    assert list(uploads.iterdir()) == []


@pytest.mark.parametrize("clip", real_video_paths(), ids=lambda p: p.name)
def test_one_decode_per_request(
    client: TestClient, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = DecodeCounter(monkeypatch)
    n = count_packets(clip)
    stride = max(1, n // 4)  # a few frames, to keep the flow and the backbone cheap
    for params, used in (
        ({"max_frames": 3}, 3),  # a frame limit: the selection needs the frame count
        ({"stride": stride}, len(range(0, n, stride))),  # none: every stride-th frame
    ):
        counter.opens.clear()
        with clip.open("rb") as f:
            r = client.post("/v1/predict", params=params, files={"file": ("clip", f)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["frames"]["n_frames"] == n
        assert body["frames"]["used"] == {"appearance": used, "motion": used}
        assert len(counter.opens) == 1, (params, counter.opens)


def test_frame_limit_holds_without_decoding(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = next(p for p in real_video_paths() if p.name == "mm_demo.mp4")
    counter = DecodeCounter(monkeypatch)
    monkeypatch.setattr(client.app.state.service.settings, "max_decoded_frames", 100)  # type: ignore[attr-defined]
    with clip.open("rb") as f:
        r = client.post("/v1/predict", params={"stride": 50}, files={"file": ("clip", f)})
    assert r.status_code == 413, r.text
    assert "limit of 100 frames" in r.json()["detail"]
    assert counter.opens == []


@pytest.mark.parametrize("clip", real_video_paths(), ids=lambda p: p.name)
def test_demuxer_counts_the_decoded_frames(clip: Path) -> None:
    assert count_packets(clip) == count_frames(clip)


def _kept(path: Path, **options: Any) -> np.ndarray:
    items = list(prepare_video(path, streams=("appearance",), max_frames=5, **options))
    assert isinstance(items[-1], VideoDone)
    rows = np.concatenate([c.indices for c in items if isinstance(c, FrameChunk)])
    assert np.array_equal(rows, items[-1].frame_indices)
    return items[-1].frame_indices


def test_a_miscounting_demuxer_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the demuxer's count is wrong, the frames it selects are not the evenly spread
    ones: prepare_video says so at the end, and the exact count gives the right frames."""
    clip = next(p for p in real_video_paths() if p.name == "mm_part_0.mp4")
    t = count_frames(clip)
    right = _kept(clip)
    assert np.array_equal(right, np.round(np.linspace(0, t - 1, 5)).astype(np.int64))
    monkeypatch.setattr("extractor.prepare.count_packets", lambda _p: t - 3)
    with pytest.raises(FrameCountChanged, match=f"counted {t - 3} frames but {t} decoded"):
        _kept(clip)
    assert np.array_equal(_kept(clip, n_frames=t), right)


def test_a_miscounted_upload_is_decoded_again_with_the_true_count(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = next(p for p in real_video_paths() if p.name == "mm_part_0.mp4")

    def post() -> dict[str, Any]:
        with clip.open("rb") as f:
            r = client.post("/v1/predict", params={"max_frames": 3}, files={"file": ("c", f)})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    right = post()
    wrong = count_frames(clip) - 3
    counter = DecodeCounter(monkeypatch)
    monkeypatch.setattr("extractor.prepare.count_packets", lambda _p: wrong)
    again = post()
    assert len(counter.opens) == 2  # the wrong selection, then the right one
    assert again["top_k"] == right["top_k"]
