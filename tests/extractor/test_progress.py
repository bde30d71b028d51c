"""Extraction progress: plain lines off a terminal (videos, frames, frames/s, ETA, failures), a
bar with frames/s on one."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from api.cli import main
from extractor.progress import ExtractProgress


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_every_interval_with_counts_rate_and_eta() -> None:
    out, clock = io.StringIO(), _Clock()
    p = ExtractProgress(4, stream=out, interval=5.0, clock=clock)
    assert not p.lines or out.getvalue() == ""
    clock.now += 2
    p.frames(20)  # 2 s after the start: too soon for a line
    assert out.getvalue() == ""
    clock.now += 3
    p.video_done()  # 5 s: a line
    clock.now += 1
    p.frames(30)  # 6 s: too soon again
    clock.now += 4
    p.video_failed()  # 10 s
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "extract: 1/4 videos, 20 frames, 4.0 frames/s, 0:00:05 elapsed, ETA 0:00:15, 0 failed",
        "extract: 2/4 videos, 50 frames, 5.0 frames/s, 0:00:10 elapsed, ETA 0:00:10, 1 failed",
        "extract: 2/4 videos, 50 frames, 5.0 frames/s, 0:00:10 elapsed, ETA 0:00:10, 1 failed",
    ]
    p.close()  # once only
    assert len(out.getvalue().splitlines()) == 3


def test_no_eta_before_the_first_video_and_nothing_when_disabled() -> None:
    out, clock = io.StringIO(), _Clock()
    p = ExtractProgress(3, stream=out, interval=0.0, clock=clock)
    clock.now += 1
    p.frames(8)
    assert out.getvalue().splitlines() == [
        "extract: 0/3 videos, 8 frames, 8.0 frames/s, 0:00:01 elapsed, ETA ?, 0 failed"
    ]
    quiet = io.StringIO()
    q = ExtractProgress(3, stream=quiet, enabled=False, interval=0.0, clock=clock)
    q.frames(8)
    q.video_done()
    q.close()
    assert quiet.getvalue() == "" and (q.n_frames, q.done) == (8, 1)


def test_the_terminal_bar_shows_frames_per_second() -> None:
    out, clock = io.StringIO(), _Clock()
    p = ExtractProgress(2, stream=out, bar=True, clock=clock)
    clock.now += 2
    p.frames(64)
    p.video_done()
    p.video_done()
    p.close()
    text = out.getvalue()
    assert "2/2" in text and "64 frames, 32.0 frames/s, 0 failed" in text
    assert "ETA" not in text  # the bar's own time estimate, not a plain line


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        ExtractProgress(1, interval=-1.0)
    with pytest.raises(ValueError, match="total"):
        ExtractProgress(-1)


_LINE = re.compile(
    r"^extract: (\d+)/(\d+) videos, ([\d,]+) frames, [\d.]+ frames/s, \d+:\d\d:\d\d elapsed, "
    r"ETA (\?|\d+:\d\d:\d\d), (\d+) failed$"
)


def test_extract_off_a_terminal_prints_progress_lines(
    short_real_video: Path,
    real_videos: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    other = next(p for p in real_videos if p.name == "mm_demo_spatiotemporal_det.mp4")
    args = ["extract", str(short_real_video), str(other), str(broken)]
    args += ["--store", str(tmp_path / "s.zarr"), "--streams", "appearance", "--arch", "resnet18"]
    args += ["--weights", "random", "--max-frames", "6", "--batch-size", "4", "--device", "cpu"]
    assert main([*args, "--progress-interval", "0"]) == 1  # the broken file fails
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("extract: ")]
    assert len(lines) >= 3, err
    parsed = [_LINE.match(line) for line in lines]
    assert all(parsed), lines
    last = parsed[-1]
    assert last is not None
    assert last.group(1, 2, 3, 5) == ("3", "3", "12", "1")
    frames = [int(m.group(3).replace(",", "")) for m in parsed if m]
    assert frames == sorted(frames)
    # --no-progress: none (a rerun redoes only the failed file)
    assert main([*args, "--progress-interval", "0", "--no-progress"]) == 1
    assert "extract: " not in capsys.readouterr().err
