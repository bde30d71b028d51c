"""``framepool finetune`` on real clips: run, resume with more epochs, re-extract with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.finetune.memory import ACTIVATION_SHARE
from aggregator.node_cache import BUDGET_ENV
from api.cli import main
from storage import FeatureStore


def _videos(labels: Path) -> list[str]:
    return [line.split(",")[0] for line in labels.read_text().splitlines()[1:]]


def _args(labels: Path, out: Path, *extra: str) -> list[str]:
    videos = _videos(labels)
    return [
        "finetune", "--videos", *videos, "--labels", str(labels), "--out", str(out),
        "--arch", "resnet18", "--weights", "random", "--max-frames", "3",
        "--levels", "2", "--node-dim", "16", "--period", "2", "--batch-videos", "2",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def test_bad_values_are_usage_errors(labelled: Path, tmp_path: Path) -> None:
    assert main(_args(labelled, tmp_path / "o", "--period", "0", "--epochs", "1")) == 2
    assert main(_args(labelled, tmp_path / "o", "--grad-frames", "0", "--epochs", "1")) == 2
    assert main(_args(labelled, tmp_path / "o", "--lr-steps", "x", "--epochs", "1")) == 2
    assert main([*_args(labelled, tmp_path / "o", "--epochs", "1"), "--head", "nope"]) == 2
    # --levels (in every call here) does not apply to gap
    assert main([*_args(labelled, tmp_path / "o", "--epochs", "1"), "--head", "gap"]) == 2


def test_run_resume_and_reextract(
    labelled: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)  # --memory-budget sets it for this process
    out = tmp_path / "run"
    assert main(_args(labelled, out, "--epochs", "1", "--memory-budget", "300M")) == 0
    # the frames with gradient per backward chunk follow the budget, and are recorded
    config = json.loads((out / "config.json").read_text())
    chunks = config["backward_chunks"]
    per_frame = chunks["activation_bytes_per_frame"]["appearance"]
    assert 15 << 20 < per_frame < 30 << 20  # resnet18 at 224 x 224 keeps ~21 MiB a frame
    assert chunks["chosen_by"] == "memory_budget" and chunks["memory_budget"] == 300 << 20
    assert chunks["grad_frames"] == (300 << 20) // ACTIVATION_SHARE // per_frame == 4
    assert config["settings"]["grad_frames"] == 4
    assert "frames with gradient per backward chunk: 4 (chosen from" in capsys.readouterr().out
    first = json.loads((out / "metrics.json").read_text())["epochs"]
    assert len(first) == 1 and first[0]["frames_total"] == 6  # the two train-split clips
    assert first[0]["frames_with_grad"] == 4  # frames 0 and 2 of each

    store = tmp_path / "tuned.zarr"
    # resumes at epoch 2 (its backward pass one frame at a time), then extracts the clips with
    # the tuned backbone
    extra = ("--epochs", "2", "--grad-frames", "1", "--reextract", str(store))
    assert main(_args(labelled, out, *extra)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["epochs"][0] == first[0]
    assert metrics["epochs"][1]["frames_with_grad"] == 2  # frame 1 of each
    printed = capsys.readouterr().out
    assert f"--weights {out / 'backbone_appearance.pt'}" in printed
    # --grad-frames wins over the budget
    config = json.loads((out / "config.json").read_text())
    assert config["backward_chunks"] == {"grad_frames": 1, "chosen_by": "grad_frames"}
    assert config["settings"]["grad_frames"] == 1
    assert "frames with gradient per backward chunk: 1 (--grad-frames)" in printed

    recorded = FeatureStore.open(store).extractor["appearance"]
    config = json.loads((out / "config.json").read_text())
    assert recorded == config["extractor"]["appearance"]  # the tuned head fits the new store
    assert main(["evaluate", "--run", str(out), "--store", str(store), "--split", "test"]) == 0
    assert sorted(FeatureStore.open(store).videos()) == sorted(
        Path(v).stem for v in _videos(labelled)
    )
