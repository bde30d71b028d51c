"""torchcodec decoding gives PyAV's frames, fails like it, and ``--decoder`` picks the right one."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from extractor import decode_torchcodec
from extractor.decode import VideoError, iter_frames
from extractor.decode_torchcodec import (
    TorchcodecError,
    iter_frames_torchcodec,
    make_frame_reader,
    resolve_decoder,
    torchcodec_problem,
)
from tests.extractor.conftest import textured_frames, write_clip

needs_torchcodec = pytest.mark.skipif(
    torchcodec_problem() is not None, reason=str(torchcodec_problem())
)

# Measured on the real clips with the system's FFmpeg 5.1: 11 of 12 decode to PyAV's frames bit
# for bit; on the mpeg4 clip tu_v_Basketball_g01_c01.avi 30 of 32.5 million values differ, by at
# most 2 (the mpeg4 decoders of FFmpeg 5.1 and PyAV's FFmpeg 8; with PyAV's FFmpeg all 12 are
# equal). The bounds leave no room for a colour conversion or a frame shift.
MAX_LEVELS = 2
MAX_DIFFERING = 1e-5


def _compare(path: Path) -> tuple[int, int, int, int]:
    """(frames, values, differing values, largest difference) of torchcodec vs PyAV on the CPU."""
    n = values = differing = worst = 0
    for a, t in itertools.zip_longest(iter_frames(path), iter_frames_torchcodec(path)):
        assert a is not None and t is not None, f"{path.name}: frame counts differ at {n}"
        b = t.numpy()
        assert b.shape == a.shape and b.dtype == np.uint8, (path.name, n, b.shape, a.shape)
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        values += d.size
        differing += int(np.count_nonzero(d))
        worst = max(worst, int(d.max()))
        n += 1
    return n, values, differing, worst


@needs_torchcodec
def test_real_clips_give_pyav_frames(real_videos: list[Path]) -> None:
    exact = 0
    for path in real_videos:
        n, values, differing, worst = _compare(path)
        assert n > 0
        assert worst <= MAX_LEVELS, (path.name, worst)
        assert differing <= MAX_DIFFERING * values, (path.name, differing, values)
        exact += differing == 0
    assert exact >= len(real_videos) - 1  # only the one mpeg4 clip differs at all


@needs_torchcodec
@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_generated_clip_bit_exact(tmp_path: Path, codec: str) -> None:
    clip = write_clip(tmp_path / f"c_{codec}.mp4", textured_frames(9, 64, 96), codec=codec)
    n, values, differing, _ = _compare(clip)
    assert n == 9 and values == 9 * 64 * 96 * 3 and differing == 0


@needs_torchcodec
def test_the_avi_frames_without_timestamps_are_kept(real_videos: list[Path]) -> None:
    # index access in torchcodec loses the last 2 frames of this file; sequential reading must not
    clip = next(p for p in real_videos if p.name == "mm_S001C001P001R001A001_rgb.avi")
    assert sum(1 for _ in iter_frames_torchcodec(clip)) == 103


@needs_torchcodec
@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("zero", "empty file"),
        ("text", "cannot be read as a video"),
        ("audio", "no video stream"),
        ("truncated_avi", "truncated"),
        ("truncated_mp4", "cannot be read as a video"),
        ("missing", "no such file"),
    ],
)
def test_bad_inputs_fail_like_pyav(bad_inputs: dict[str, Path], kind: str, problem: str) -> None:
    path = bad_inputs[kind]
    with pytest.raises(VideoError, match=problem) as got:
        list(iter_frames_torchcodec(path))
    assert repr(str(path)) in str(got.value)
    with pytest.raises(VideoError, match=problem):
        list(iter_frames(path))


def test_resolve_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert resolve_decoder("pyav", cuda) == ("pyav", cpu)
    assert resolve_decoder("auto", cpu) == ("pyav", cpu)
    assert make_frame_reader("pyav", cpu) is iter_frames
    with pytest.raises(ValueError, match="'nvdec'"):
        resolve_decoder("nvdec", cpu)
    monkeypatch.setattr(decode_torchcodec, "torchcodec_problem", lambda: None)
    assert resolve_decoder("auto", cuda) == ("torchcodec", cuda)
    assert resolve_decoder("torchcodec", cpu) == ("torchcodec", cpu)
    monkeypatch.setattr(decode_torchcodec, "torchcodec_problem", lambda: "no FFmpeg here")
    assert resolve_decoder("auto", cuda) == ("pyav", cpu)  # falls back, with a warning
    with pytest.raises(ValueError, match="--decoder torchcodec: no FFmpeg here"):
        resolve_decoder("torchcodec", cuda)


@needs_torchcodec
def test_cpu_reader_yields_numpy(short_real_video: Path) -> None:
    read = make_frame_reader("torchcodec", "cpu")
    frames = list(read(short_real_video))
    assert len(frames) == 32 and all(isinstance(f, np.ndarray) for f in frames)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_torchcodec
def test_nvdec_frames_close_to_pyav(real_videos: list[Path]) -> None:
    # NVDEC converts YUV to RGB itself; bounds for a conversion that differs in rounding and
    # chroma filtering, not in colour matrix or frame order.
    for path in real_videos:
        frames = iter_frames_torchcodec(path, device="cuda")
        n, values, differing, worst = 0, 0, 0, 0
        total = 0.0
        for a, b in itertools.zip_longest(iter_frames(path), frames):
            assert a is not None and b is not None, f"{path.name}: frame counts differ at {n}"
            d = np.abs(a.astype(np.int16) - b.cpu().numpy().astype(np.int16))
            total += float(d.sum())
            values += d.size
            differing += int(np.count_nonzero(d > 8))
            worst = max(worst, int(d.max()))
            n += 1
        mean = total / values
        print(f"{path.name}: {n} frames, mean |diff| {mean:.3f}, >8: {differing / values:.2e}")
        assert mean < 2.0, (path.name, mean)
        assert differing < 0.01 * values, (path.name, differing / values)


def test_auto_falls_back_to_pyav_when_torchcodec_fails_first(
    monkeypatch: pytest.MonkeyPatch, short_real_video: Path
) -> None:
    def failing(path: Path, **_: object) -> Iterator[torch.Tensor]:
        raise TorchcodecError(f"{str(path)!r}: torchcodec cannot decode the video stream")
        yield torch.zeros(0)  # a generator, like the real one

    monkeypatch.setattr(decode_torchcodec, "torchcodec_problem", lambda: None)
    monkeypatch.setattr(decode_torchcodec, "iter_frames_torchcodec", failing)
    frames = list(make_frame_reader("auto", torch.device("cuda:0"))(short_real_video))
    want = list(iter_frames(short_real_video))
    assert len(frames) == len(want) == 32
    np.testing.assert_array_equal(frames[5], want[5])
    with pytest.raises(TorchcodecError, match="torchcodec cannot decode"):
        list(make_frame_reader("torchcodec", "cpu")(short_real_video))
