"""Fixtures shared by the aggregator tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def labelled(real_videos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels CSV of three real clips: two for training, mm_test.avi for testing."""
    names = {"mm_part_0.mp4": "a", "mm_demo_spatiotemporal_det.mp4": "b", "mm_test.avi": "a"}
    csv = tmp_path_factory.mktemp("labels") / "labels.csv"
    rows = [
        f"{p},{names[p.name]},{'test' if p.name == 'mm_test.avi' else 'train'}"
        for p in real_videos
        if p.name in names
    ]
    csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return csv
