"""The SVM selection: validation folds pooled to enough videos, the pyramid depth chosen with C."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.metrics import classification_metrics
from aggregator.node_cache import load_node_cache
from aggregator.rundir import further_folds, labelled_splits
from aggregator.svm import config as svm_config
from aggregator.svm import selection as svm_selection
from aggregator.svm.predictor import SVMPredictor
from aggregator.svm.run import train_svm
from storage import FeatureStore
from tests.aggregator.svm.test_run import order_store, run_args
from tests.aggregator.test_validation_groups import _write_grouped_store


def test_further_folds_take_each_class_in_turn_from_the_fit_part() -> None:
    labels = np.repeat(np.arange(3), 10)
    val = np.array([0, 10, 20])
    fit = np.setdiff1d(np.arange(30), val)[::-1]  # any order: folds follow it
    folds = further_folds(labels, fit, val, None, min_validation=9, max_folds=10)
    assert len(folds) == 2  # 3 + 3 + 3 pooled videos reach 9
    for k, fold in enumerate(folds):
        assert sorted(labels[fold]) == [0, 1, 2]
        expected = [fit[labels[fit] == c][k] for c in range(3)]
        assert sorted(fold.tolist()) == sorted(expected)
    everything = np.concatenate([val, *folds])
    assert len(set(everything.tolist())) == len(everything)  # disjoint
    assert len(further_folds(labels, fit, val, None, min_validation=90, max_folds=4)) == 3
    # a class with two videos: one validates in fold 0, the other must stay to fit; repeated
    # folds may swap them, but no fold takes both
    few = np.array([0, 0, 1, 1, 1, 1])
    more = further_folds(few, np.array([1, 3, 4, 5]), np.array([0, 2]), None,
                         min_validation=10, max_folds=5)  # fmt: skip
    assert len(more) == 4
    for fold in more:
        assert sorted(few[fold].tolist()) == [0, 1]


def test_further_folds_take_the_next_group_folds() -> None:
    labels = np.zeros(12, dtype=np.int64)
    groups = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 7, 8]), np.array([9, 10])]
    fit = np.arange(3, 12)
    out = further_folds(labels, fit, groups[0], groups[1:], min_validation=7, max_folds=10)
    assert [f.tolist() for f in out] == [[3, 4, 5], [6, 7, 8]]
    out = further_folds(labels, fit, groups[0], groups[1:], min_validation=100, max_folds=2)
    assert [f.tolist() for f in out] == [[3, 4, 5]]


def test_svm_chooses_a_depth_that_sees_temporal_order(tmp_path: Path) -> None:
    """Every class has the same mean over the whole video: one level cannot tell them apart,
    two can. With ``levels=None`` the depth is chosen on validation folds pooled from the
    small training split, refit, and the run reloads with the chosen depth."""
    store = order_store(tmp_path / "store.zarr", n_train=8, n_test=3, seed=1)
    metrics = train_svm(
        store, tmp_path / "run", **run_args(streams=["appearance"], levels=None, probe=False)
    )
    info = metrics["svm"]["appearance"]
    # 8 per class: 7 disjoint folds leave one to fit, then repeated folds up to MAX_FOLDS
    assert metrics["selection_folds"] == [6] * svm_selection.MAX_FOLDS
    grid = {g["levels"]: g for g in info["C_grid"]}
    assert sorted(grid) == list(range(1, svm_config.MAX_LEVELS + 1))
    for g in grid.values():
        assert len(g["fold_val_top1"]) == svm_selection.MAX_FOLDS
        assert g["val_top1"] == pytest.approx(np.mean(g["fold_val_top1"]))
    assert grid[1]["val_top1"] < 0.5 and info["levels"] >= 2
    assert info["levels"] == max(grid, key=lambda d: (grid[d]["val_top1"], -d))
    assert metrics["selection"]["appearance"]["chosen"] == {"levels": info["levels"], "C": 1.0}
    assert metrics["top1"] >= 0.9
    assert sum(len(lv) for lv in metrics["beta"]["appearance"]) == 2 ** info["levels"] - 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["params"]["levels"] is None
    # the saved run scores the test videos as the run did
    predictor = SVMPredictor.load(tmp_path / "run")
    assert predictor.levels == info["levels"]
    ids = store.videos(split="test")
    y = np.array([predictor.class_names.index(label) for label in store.labels(ids)])
    nodes = {"appearance": load_node_cache(store, "appearance").take(ids, info["levels"])}
    again = classification_metrics(predictor.predict_proba_nodes(nodes), y, predictor.class_names)
    assert again["top1"] == metrics["top1"]


def _mean_store(path: Path) -> FeatureStore:
    """Classes told apart by their mean alone, with plenty of margin: every depth scores the
    same, so the selection must fall back on its tie rule."""
    rng = np.random.default_rng(0)
    store = FeatureStore.create(path, extractor={"appearance": {"backbone": "toy"}})
    for c in range(3):
        for i in range(12):
            x = rng.normal(size=(int(rng.integers(8, 20)), 4))
            x[:, c] += 6.0
            split = "train" if i < 9 else "test"
            store.write_video(f"c{c}_{i:02d}", {"appearance": x}, label=f"k{c}", split=split)
    return store


def test_ties_go_to_the_fewest_levels_and_the_smaller_C(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(svm_config, "MAX_LEVELS", 3)
    monkeypatch.setattr(svm_selection, "MAX_FOLDS", 3)
    store = _mean_store(tmp_path / "store.zarr")
    metrics = train_svm(
        store,
        tmp_path / "run",
        **run_args(streams=["appearance"], levels=None, C=None, C_grid=(0.1, 1.0), probe=False),
    )
    grid = metrics["svm"]["appearance"]["C_grid"]
    assert len(grid) == 2 * 3 and metrics["selection_folds"] == [3, 3, 3]
    assert all(g["val_top1"] == 1.0 for g in grid)
    assert metrics["selection"]["appearance"]["chosen"] == {"levels": 1, "C": 0.1}
    assert metrics["top1"] == 1.0


def test_svm_folds_hold_out_whole_groups(tmp_path: Path) -> None:
    path = _write_grouped_store(tmp_path / "store.zarr")
    store = FeatureStore.open(path)
    splits = labelled_splits(store, "train", "test", val_fraction=0.1, seed=0)
    assert splits.group_by == "store"
    folds = svm_selection.selection_folds(splits)
    assert len(folds) == len(splits.more_folds) + 1  # 36 videos: every group is pooled
    groups = store.groups(splits.train_ids)
    seen: set[str] = set()
    for fold in folds:
        held = {groups[i] for i in fold}
        fit = {groups[i] for i in np.setdiff1d(np.arange(len(groups)), fold)}
        assert held and not held & fit and not held & seen
        seen |= held
    metrics = train_svm(
        store, tmp_path / "run", **run_args(streams=["appearance"], levels=2, probe=False)
    )
    assert metrics["selection_folds"] == [len(folds[0])]  # one configuration: fold 0 only


def test_without_a_validation_video_nothing_is_chosen(tmp_path: Path) -> None:
    """One training video per class leaves nothing to validate on: the tie rule's choice (one
    level, the smallest C) is the only fit, with equal weights and temperature 1."""
    rng = np.random.default_rng(0)
    store = FeatureStore.create(tmp_path / "store.zarr", extractor={"appearance": {"b": "toy"}})
    for c in range(2):
        for i, split in enumerate(("train", "test", "test")):
            x = rng.normal(size=(10, 3)) + 4.0 * c
            store.write_video(f"c{c}_{i}", {"appearance": x}, label=f"k{c}", split=split)
    metrics = train_svm(
        store,
        tmp_path / "run",
        **run_args(streams=["appearance"], levels=None, C=None, probe=False),
    )
    assert metrics["n_val"] == 0 and metrics["selection_folds"] == []
    assert metrics["calibration"].startswith("none")
    assert metrics["selection"]["appearance"]["chosen"] == {"levels": 1, "C": 0.1}
    [grid] = metrics["svm"]["appearance"]["C_grid"]
    assert grid["val_top1"] is None and grid["fold_val_top1"] == []
    assert metrics["top1"] == 1.0
