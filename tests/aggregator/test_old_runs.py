"""Run directories written by an earlier framepool still load, predict and evaluate the same.

``tests/fixtures/runs-0.1`` was written by ``tests/fixtures/make_runs.py`` with framepool 0.1.0 as
of commit b0c1b25 (before the aggregator's layout changed): one small run per head and stream
choice, each with that version's probabilities and embeddings for six test videos. Here the
current code loads every run (as ``evaluate`` and ``serve`` do) and must give the same numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from aggregator.evaluate import evaluate_run
from aggregator.run_loader import load_run
from api.service.served_runs import load_one
from storage import FeatureStore

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "runs-0.1"
CLASSES = ["a", "b", "c"]
RUNS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def _test_videos() -> dict[str, dict[str, np.ndarray]]:
    with np.load(FIXTURES / "features.npz") as data:
        videos: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            video, stream = key.split("/")
            videos.setdefault(video, {})[stream] = data[key]
    return dict(sorted(videos.items()))


def expected_embedding(run_dir: Path) -> np.ndarray:
    with np.load(run_dir / "expected.npz") as expected:
        return np.asarray(expected["embed"][0], dtype=np.float32)


def _label(video_id: str) -> str:
    return CLASSES[int(video_id[1:]) % 3]  # as make_runs.py labels them


def test_every_head_has_a_fixture() -> None:
    heads = {name.split("-")[0] for name in RUNS}
    assert heads == {"gap", "max", "tp", "tpp", "datp", "stcb", "svm"}


@pytest.mark.parametrize("name", RUNS)
def test_old_run_predicts_as_it_did(name: str) -> None:
    run = load_run(FIXTURES / name)
    videos = _test_videos()
    with np.load(FIXTURES / name / "expected.npz") as expected:
        proba = np.stack(
            [run.predict_proba({s: f[s] for s in run.streams}) for f in videos.values()]
        )
        embed = np.stack([run.embed({s: f[s] for s in run.streams}) for f in videos.values()])
        np.testing.assert_allclose(proba, expected["proba"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(embed, expected["embed"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tp-both", "svm-rbf", "gap-appearance"])
def test_old_run_evaluates_and_serves(name: str, tmp_path: Path) -> None:
    run_dir = tmp_path / name
    shutil.copytree(FIXTURES / name, run_dir)
    store_path = tmp_path / "store.zarr"
    store = FeatureStore.create(store_path, class_names=CLASSES)
    videos = _test_videos()
    for video_id, feats in videos.items():
        store.write_video(video_id, feats, label=_label(video_id), split="test")
        store.write_video(f"train-{video_id}", feats, label=_label(video_id), split="train")
    with np.load(run_dir / "expected.npz") as expected:
        predicted = expected["proba"].argmax(axis=1)
    truth = np.array([CLASSES.index(_label(v)) for v in videos])
    metrics = evaluate_run(run_dir, store_path)
    assert metrics["top1"] == pytest.approx(float(np.mean(predicted == truth)))
    served = load_one(run_dir, store_path)  # as `framepool serve --run DIR --store PATH` does
    assert served.index is not None
    hits = served.index.search(expected_embedding(run_dir), 1)
    assert hits[0].video_id == f"train-{next(iter(videos))}" and hits[0].distance < 1e-4
    first = next(iter(videos.values()))
    np.testing.assert_allclose(
        served.predictor.predict_proba({s: first[s] for s in served.predictor.streams}),
        load_run(run_dir).predict_proba({s: first[s] for s in served.predictor.streams}),
    )
