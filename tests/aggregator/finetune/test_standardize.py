"""A fine-tuning run standardises its head's inputs with statistics of its training videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.finetune.job import run_finetune_job, start_extractor
from aggregator.finetune.loop import FinetuneSettings
from aggregator.heads import TwoStream
from aggregator.run_loader import TorchRun
from extractor.spec import BackboneSpec

SPEC = BackboneSpec(streams=("appearance",), arch="resnet18", weights="random")


@pytest.fixture(scope="module")
def two_clips(real_videos: list[Path]) -> dict[str, Path]:
    names = ("mm_part_0.mp4", "mm_demo_spatiotemporal_det.mp4")
    return {p.stem: p for p in real_videos if p.name in names}


def test_finetune_fits_the_standardisation_on_its_training_videos(
    two_clips: dict[str, Path], tmp_path: Path
) -> None:
    """The head's statistics are those of the training videos' global means under the starting
    backbone (computed here independently, by the extractor), recorded in config.json, saved in
    model.pt, and the loaded run applies them."""
    labels = {v: f"class{i}" for i, v in enumerate(sorted(two_clips))}
    out = tmp_path / "run"
    run_finetune_job(
        two_clips,
        labels,
        out,
        backbone=SPEC,
        settings=FinetuneSettings(period=2, epochs=1, batch_videos=2, chunk_size=4),
        head="gap",
        max_frames=4,
        cache_dir="memory",
    )
    fx = start_extractor(SPEC, torch.device("cpu"), amp=False)
    means = np.stack(
        [
            fx.extract_file(p, max_frames=4).features["appearance"].mean(0)
            for p in two_clips.values()
        ]
    ).astype(np.float64)
    config = json.loads((out / "config.json").read_text())
    assert config["standardize"] is True
    state = torch.load(out / "model.pt", weights_only=True)
    mean, std = state["standardizer.mean_appearance"], state["standardizer.std_appearance"]
    assert np.allclose(mean.numpy(), means.mean(0), rtol=1e-2, atol=1e-3)
    spread = means.std(0)
    kept = spread > 1e-3  # features that differ between the two videos (the others: std 1)
    assert kept.sum() > 10
    assert np.allclose(std.numpy()[kept], spread[kept], rtol=2e-2, atol=1e-3)
    run = TorchRun.load(out)  # as evaluate and the service load it
    assert isinstance(run.model, TwoStream) and run.model.standardizer is not None
    loaded_mean, loaded_std = run.model.standardizer.statistics("appearance")
    assert torch.equal(loaded_mean, mean) and torch.equal(loaded_std, std)
