"""Shared fixtures: where the real clips are, and a small helper for writing toy stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_VIDEOS = Path(
    os.environ.get("FRAMEPOOL_TEST_VIDEOS", REPO.parent / "shared" / "data" / "videos")
)
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm"}


def real_video_paths() -> list[Path]:
    """Every real clip in ``../shared/data/videos`` (sorted). Missing clips fail, never skip."""
    if not REAL_VIDEOS.is_dir():
        raise FileNotFoundError(
            f"real test clips not found at {REAL_VIDEOS}; set FRAMEPOOL_TEST_VIDEOS to their folder"
        )
    paths = sorted(p for p in REAL_VIDEOS.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no video files in {REAL_VIDEOS}")
    return paths


@pytest.fixture(scope="session")
def real_videos() -> list[Path]:
    return real_video_paths()


@pytest.fixture(scope="session")
def short_real_video(real_videos: list[Path]) -> Path:
    """The shortest real clip (32 frames), for tests that need one real video quickly."""
    return next(p for p in real_videos if p.name == "mm_part_0.mp4")
