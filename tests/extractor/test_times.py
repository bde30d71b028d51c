"""Presentation times: decoded stamps, --fps selection against a naive reference, stored times,
and the fallback for stores written without times. A generated variable-frame-rate clip and the
shipped real clips."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from api.cli import main
from extractor.decode import frame_times, iter_timed_frames, times_from_stamps
from extractor.pipeline import run_extract
from extractor.prepare import select_at_fps
from extractor.spec import BackboneSpec
from storage import FeatureStore
from storage.export import export_store
from tests.conftest import real_clip

# irregular presentation times in ms: gaps of 1 to 200 ms, like a phone clip or a screen recording
VFR_MS = [0, 40, 50, 130, 163, 283, 288, 328, 500, 520, 560, 700, 701, 760, 900, 1000, 1012, 1100]
SPEC = BackboneSpec(weights="random", arch="resnet18", dtype="float32")


def write_vfr_clip(path: Path, pts_ms: list[int]) -> Path:
    """A clip whose frames carry the given presentation times (time base 1/1000), each frame a
    different texture so that which frame was used shows in its features."""
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.time_base = Fraction(1, 1000)
        stream.options = {"qscale": "2"}
        for pts in pts_ms:
            image = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((4, 4, 1))).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def vfr_clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("vfr")
    return [write_vfr_clip(d / f"vfr.{ext}", VFR_MS) for ext in ("mkv", "mp4")]


def naive_times(path: Path) -> list[float]:
    """Every decoded frame's ``pts * time_base``, in increasing order."""
    with av.open(str(path)) as container:
        return sorted(float(f.pts * f.time_base) for f in container.decode(video=0))


def naive_fps_picks(times: list[float], fps: float) -> list[int]:
    """For each instant t0 + k/F up to the last frame: the last frame whose time <= the instant."""
    picks = []
    k = 0
    while times[0] + k / fps <= times[-1] + 1e-6:
        instant = times[0] + k / fps
        shown = 0
        for i, t in enumerate(times):
            if t <= instant + 1e-6:
                shown = i
        picks.append(shown)
        k += 1
    return picks


def test_frame_times_are_the_decoders(vfr_clips: list[Path], real_videos: list[Path]) -> None:
    for clip in vfr_clips:
        np.testing.assert_allclose(frame_times(clip).seconds, np.array(VFR_MS) / 1000, atol=1e-12)
    for path in [*vfr_clips, *real_videos]:
        want = naive_times(path)
        got = frame_times(path)
        assert got.estimated == 0 and got.seconds.dtype == np.float64
        np.testing.assert_allclose(got.seconds, want, rtol=0, atol=1e-9, err_msg=path.name)
    for path in [vfr_clips[1], real_clip("mm_test.avi")]:
        stamps: list[float | None] = []
        n = sum(1 for _ in iter_timed_frames(path, stamps))  # the same times from the one decode
        got = frame_times(path)
        assert n == len(got.seconds)
        fps = float(av.open(str(path)).streams.video[0].average_rate)
        np.testing.assert_array_equal(times_from_stamps(stamps, fps).seconds, got.seconds)


def test_missing_stamps_are_estimated_from_the_rate() -> None:
    t = times_from_stamps([0.0, None, 0.2, None], fps=10.0)
    np.testing.assert_allclose(t.seconds, [0.0, 0.1, 0.2, 0.3])
    assert t.estimated == 2


def test_select_at_fps_matches_the_naive_reference(
    vfr_clips: list[Path], real_videos: list[Path]
) -> None:
    series = [np.array(VFR_MS) / 1000] + [frame_times(p).seconds for p in real_videos[:3]]
    for times in series:
        for fps in (0.7, 1.0, 7.5, 25.0, 29.97, 60.0):
            got = select_at_fps(times, fps).tolist()
            assert got == naive_fps_picks(times.tolist(), fps), fps
    # the VFR clip at 10/s: instants 0, 0.1, ..., 1.1 -> the frame shown at each
    assert select_at_fps(np.array(VFR_MS) / 1000, 10.0).tolist() == [
        0, 2, 4, 6, 7, 8, 10, 11, 13, 14, 15, 17,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="positive"):
        select_at_fps(np.array([0.0]), 0.0)


def test_extract_fps_keeps_the_frame_shown_at_each_instant(
    vfr_clips: list[Path], tmp_path: Path
) -> None:
    """On the VFR clip and real clips (an AVI with permuted stamps, a 6/s clip sampled at 10/s):
    the stored rows are the naive reference's frames, with the decoder's times; and on the VFR
    clip each row's features are those of that frame in an extraction of every frame (motion
    stacks of frames kept twice included)."""
    clips = [vfr_clips[0], real_clip("mm_test.avi"), real_clip("mm_demo_spatiotemporal_det.mp4")]
    rates = {clips[0].stem: 20.0, clips[1].stem: 3.0, clips[2].stem: 7.0}
    streams = {clips[0].stem: ("appearance", "motion")}  # the real clips: appearance, quicker
    stores = {}
    for clip in clips:
        stores[clip.stem] = tmp_path / f"{clip.stem}.zarr"
        summary = run_extract(
            [clip],
            stores[clip.stem],
            replace(SPEC, streams=streams.get(clip.stem, ("appearance",))),
            device="cpu",
            workers=1,
            progress=False,
            sample_fps=rates[clip.stem],
        )
        assert summary.ok, summary.format()
    for clip in clips:
        store = FeatureStore.open(stores[clip.stem])
        (vid,) = store.videos()
        times = naive_times(clip)
        picks = naive_fps_picks(times, rates[clip.stem])
        assert store.video_attrs(vid)["frame_indices"] == picks
        assert len(set(picks)) < len(picks) or clip.stem == "mm_test"  # frames kept twice
        for stream in streams.get(clip.stem, ("appearance",)):
            got = store.times(vid, stream)
            assert not got.derived and store.n_frames(vid, stream) == len(picks)
            np.testing.assert_allclose(got.seconds, [times[i] for i in picks], atol=1e-9)
    full = tmp_path / "full.zarr"
    assert run_extract([clips[0]], full, SPEC, device="cpu", workers=1, progress=False).ok
    every, sampled = FeatureStore.open(full), FeatureStore.open(stores[clips[0].stem])
    (vid,) = every.videos()
    picks = sampled.video_attrs(vid)["frame_indices"]
    for stream in ("appearance", "motion"):
        np.testing.assert_allclose(
            sampled.read(vid, stream), every.read(vid, stream)[picks], rtol=1e-2, atol=1e-2
        )
        np.testing.assert_allclose(every.times(vid, stream).seconds, np.array(VFR_MS) / 1000)


def test_stored_times_with_a_stride_come_from_the_same_decode(tmp_path: Path) -> None:
    clip = real_clip("mm_S001C001P001R001A001_rgb.avi")  # h264 AVI: stamps 1, 2, 4, 3, ...
    store_path = tmp_path / "s.zarr"
    spec = BackboneSpec(weights="random", arch="resnet18", dtype="float32", streams=("appearance",))
    summary = run_extract([clip], store_path, spec, device="cpu", stride=9, progress=False)
    assert summary.ok, summary.format()
    store = FeatureStore.open(store_path)
    (vid,) = store.videos()
    times = naive_times(clip)
    got = store.times(vid, "appearance")
    assert not got.derived
    np.testing.assert_allclose(got.seconds, times[::9], atol=1e-9)


def test_stores_without_times_derive_them_and_say_so(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "old.zarr", extractor={"appearance": {"backbone": "x"}})
    x = np.ones((3, 4))
    store.write_video("sub", {"appearance": x}, meta={"fps": 25.0, "frame_indices": [0, 2, 5]})
    store.write_video("all", {"appearance": x}, meta={"fps": 30.0})
    sub = store.times("sub", "appearance")
    assert sub.derived and sub.spans is None
    np.testing.assert_allclose(sub.seconds, [0.0, 0.08, 0.2])
    np.testing.assert_allclose(store.times("all", "appearance").seconds, [0, 1 / 30, 2 / 30])
    summary = export_store(store, tmp_path / "export")
    assert summary.derived_times == 2 and "derived from fps" in summary.format()
    np.testing.assert_allclose(
        np.load(tmp_path / "export" / "sub_appearance_times.npy"), sub.seconds
    )
    store.write_video("nofps", {"appearance": x}, meta={"fps": math.nan})
    store.write_video("bad", {"appearance": x}, meta={"times": {"appearance": [0.0, 1.0]}})
    with pytest.raises(ValueError, match=r"'nofps'.*no usable fps"):
        store.times("nofps", "appearance")
    with pytest.raises(ValueError, match=r"'bad'.*2 recorded times for 3 rows"):
        store.times("bad", "appearance")


def test_fps_usage_errors(tmp_path: Path, short_real_video: Path) -> None:
    base = ["extract", str(short_real_video), "--store", str(tmp_path / "s.zarr")]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--fps", "0"])
    assert exc.value.code == 2
    assert main([*base, "--fps", "2", "--stride", "3"]) == 2
