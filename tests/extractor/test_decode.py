from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extractor.decode import VideoError, count_frames, iter_frames, probe
from tests.conftest import SHIPPED_VIDEOS, VIDEO_SUFFIXES
from tests.extractor.conftest import textured_frames, write_clip

# decoded frame counts and sizes of the real clips, from their SOURCES.md
REAL = {
    "mm_test.mp4": (300, 340, 256),
    "mm_demo.mp4": (280, 340, 256),
    "mm_S001C001P001R001A001_rgb.avi": (103, 1920, 1080),
    "mm_test.avi": (164, 320, 240),
    "mm_part_0.mp4": (32, 340, 256),
    "mm_demo_skeleton.mp4": (72, 1920, 1080),
    "mm_demo_spatiotemporal_det.mp4": (57, 340, 256),
    "tu_v_Basketball_g01_c01.avi": (141, 320, 240),
    "vf_v_GGSY1Qvo990.mp4": (355, 320, 240),
}


def test_real_clips_decode_every_frame(real_videos: list[Path]) -> None:
    checked = 0
    for path in real_videos:
        if path.name not in REAL:
            continue
        n, w, h = REAL[path.name]
        info = probe(path)
        assert (info.width, info.height) == (w, h)
        assert info.fps > 0
        frames = list(iter_frames(path))
        assert len(frames) == n == count_frames(path)
        assert all(f.shape == (h, w, 3) and f.dtype == np.uint8 for f in frames)
        checked += 1
    shipped = {p.name for p in SHIPPED_VIDEOS.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES}
    assert shipped <= set(REAL)  # every shipped clip has its reference here
    assert checked == len({p.name for p in real_videos} & set(REAL)) >= len(shipped)


def test_presentation_order_of_generated_clip(tmp_path: Path) -> None:
    # a brightness ramp: decoded frames must come back in the order they were written
    ramp = np.stack([np.full((64, 64, 3), 20 + 10 * t, np.uint8) for t in range(20)])
    clip = write_clip(tmp_path / "ramp.mp4", ramp, codec="libx264")
    means = [float(f.mean()) for f in iter_frames(clip)]
    assert len(means) == 20
    assert np.all(np.diff(means) > 5)


def test_generated_clip_size_and_rate(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "tex.avi", textured_frames(7, 48, 80), fps=12)
    info = probe(clip)
    assert (info.width, info.height, info.fps, info.codec) == (80, 48, 12.0, "mpeg4")
    assert len(list(iter_frames(clip))) == 7


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "no such file"),
        ("zero", "empty file"),
        ("text", "cannot be read as a video"),
        ("audio", "no video stream"),
        ("truncated_avi", "truncated"),
        ("truncated_mp4", "cannot be read as a video"),
    ],
)
def test_bad_inputs_raise_video_error_naming_the_file(
    bad_inputs: dict[str, Path], kind: str, problem: str
) -> None:
    path = bad_inputs[kind]
    with pytest.raises(VideoError) as err:
        list(iter_frames(path))
    assert str(path) in str(err.value)
    assert problem in str(err.value)
    assert isinstance(err.value, ValueError)


def test_truncated_avi_fails_only_after_yielding(bad_inputs: dict[str, Path]) -> None:
    got = 0
    with pytest.raises(VideoError, match=r"decoded \d+ of the 164") as err:
        for _ in iter_frames(bad_inputs["truncated_avi"]):
            got += 1
    assert 0 < got < 164
    assert f"decoded {got} of" in str(err.value)  # the message counts what was yielded


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="directory"):
        probe(tmp_path)
