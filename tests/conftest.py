"""Shared fixtures: where the real clips are, and a small helper for writing toy stores.

The real clips are the small permissively licensed ones shipped in ``tests/data/videos`` (their
sources and licences beside them), or the folder ``FRAMEPOOL_TEST_VIDEOS`` names, which must hold
those files too (it may hold more: every test that runs over all clips then covers them all).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED_VIDEOS = REPO / "tests" / "data" / "videos"
REAL_VIDEOS = Path(os.environ.get("FRAMEPOOL_TEST_VIDEOS") or SHIPPED_VIDEOS)
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm"}


def real_video_paths() -> list[Path]:
    """Every real clip in the test clip folder (sorted). Missing clips fail, never skip."""
    if not REAL_VIDEOS.is_dir():
        raise FileNotFoundError(
            f"real test clips not found at {REAL_VIDEOS} "
            "(FRAMEPOOL_TEST_VIDEOS, else tests/data/videos)"
        )
    paths = sorted(p for p in REAL_VIDEOS.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no video files in {REAL_VIDEOS}")
    return paths


def real_clip(name: str) -> Path:
    """The real clip called ``name`` in the test clip folder; a clear error when it is not there."""
    path = REAL_VIDEOS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"real test clip {name!r} not found in {REAL_VIDEOS}; the folder FRAMEPOOL_TEST_VIDEOS "
            f"names must hold every clip of {SHIPPED_VIDEOS}"
        )
    return path


@pytest.fixture(scope="session")
def real_videos() -> list[Path]:
    return real_video_paths()


@pytest.fixture(scope="session")
def short_real_video(real_videos: list[Path]) -> Path:
    """The shortest real clip (32 frames), for tests that need one real video quickly."""
    return next(p for p in real_videos if p.name == "mm_part_0.mp4")
