"""``framepool quickstart`` end to end at a small scale: generate, extract, train, serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.cli import main
from storage import FeatureStore
from tests.conftest import REAL_VIDEOS


def test_quickstart_runs_the_whole_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "demo"
    argv = ["quickstart", "--dir", str(root), "--arch", "resnet18", "--weights", "random"]
    argv += ["--per-class", "3", "--real-clips", str(REAL_VIDEOS), "--real-max-frames", "2"]
    argv += ["--epochs", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for step in ("1/4", "2/4", "3/4", "4/4"):
        assert f"== {step}" in out
    # the demo scale is said out loud, with the full-size command
    assert "Demo scale: resnet18, every 2nd frame of 6 generated clips, 2 frames" in out
    assert "Full size: framepool quickstart --arch resnet101 --stride 1" in out
    assert "quickstart finished in" in out
    assert "-> HTTP 200" in out and "curl -s -F file=@" in out
    store = FeatureStore.open(root / "store.zarr")
    n_real = len(list(REAL_VIDEOS.glob("*.mp4"))) + len(list(REAL_VIDEOS.glob("*.avi")))
    assert len(store.videos(split="real")) == n_real  # every real clip extracted
    assert store.class_names == ["left_then_right", "right_then_left"]  # real clips: no label
    for head in ("gap", "tp"):
        metrics = json.loads((root / "runs" / head / "metrics.json").read_text())
        assert metrics["n_test"] == 2 and 0.0 <= metrics["top1"] <= 1.0
    assert (root / "runs" / "tp" / "index.faiss").is_file()
    # a second run reuses the store: nothing is extracted again
    assert main([*argv, "--no-serve"]) == 0
    assert "0 extracted" in capsys.readouterr().out
