"""A run killed with SIGKILL loses nothing finished, and a rerun finishes exactly the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import FeatureStore
from tests.conftest import REPO
from tests.extractor.conftest import textured_frames, write_clip


def _complete(store: Path) -> dict[str, str]:
    """``{video_id: extracted_at}`` of complete videos; empty while the store is being created."""
    try:
        fs = FeatureStore.open(store)
        return {v: str(fs.video_attrs(v)["extracted_at"]) for v in fs.videos()}
    except Exception:  # the writer may be half-way through creating a group
        return {}


def _check_complete_videos(store: Path) -> None:
    fs = FeatureStore.open(store)
    for vid in fs.videos():
        n = fs.video_attrs(vid)["n_frames"]
        for stream in ("appearance", "motion"):
            assert fs.read(vid, stream).shape[0] == n, (vid, stream)


def test_sigkill_mid_run_then_rerun(tmp_path: Path, real_videos: list[Path]) -> None:
    by_name = {p.name: p for p in real_videos}
    (tmp_path / "clips").mkdir()
    tiny = write_clip(tmp_path / "clips" / "tiny.avi", textured_frames(3, 96, 128))
    clips = [tiny, by_name["mm_part_0.mp4"], by_name["mm_demo_spatiotemporal_det.mp4"]]
    listing = tmp_path / "videos.txt"
    listing.write_text("\n".join(str(c) for c in clips) + "\n")
    store = tmp_path / "store.zarr"
    cmd = [
        sys.executable, "-m", "api.cli", "extract", str(listing), "--store", str(store),
        "--weights", "random", "--arch", "resnet18", "--workers", "1", "--batch-size", "4",
        "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not _complete(store):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the kill: {proc.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("no video completed within 10 minutes")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _complete(store)
    assert "tiny" in before and 1 <= len(before) < len(clips)
    _check_complete_videos(store)  # nothing complete holds partial data

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(clips) - len(before)} extracted" in rerun.stdout
    assert f"{len(before)} already complete" in rerun.stdout
    after = _complete(store)
    assert set(after) == {"tiny", "mm_part_0", "mm_demo_spatiotemporal_det"}
    assert {v: after[v] for v in before} == before  # finished videos were not redone
    _check_complete_videos(store)
    fs = FeatureStore.open(store)
    assert fs.read("mm_demo_spatiotemporal_det", "motion").shape == (57, 512)
    assert fs.read("tiny", "appearance").shape == (3, 512)
