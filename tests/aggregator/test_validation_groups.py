"""Validation parts that hold out whole groups (subjects, sessions, UCF101's gNN)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from aggregator.heads.views import pyramid_leaf_streams
from aggregator.run_data import prepare_data
from aggregator.rundir import labelled_splits
from aggregator.selection import selection_folds
from aggregator.splits import grouped_holdout, video_groups
from aggregator.train_config import TrainConfig
from aggregator.trainer import build
from storage import FeatureStore
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture

N_CLASSES, N_GROUPS, PER_CELL = 3, 6, 2  # every group shows every class twice


def _write_grouped_store(path: Path, *, with_groups: bool = True) -> str:
    """Videos named like UCF101's (``v_<class>_g<NN>_c<MM>``), each group a "subject" with its
    own offset on the features, the group stored with the video when ``with_groups``."""
    rng = np.random.default_rng(0)
    store = FeatureStore.create(path, extractor={"appearance": {"backbone": "toy"}})
    offsets = rng.normal(scale=3.0, size=(N_GROUPS, 4))
    for c in range(N_CLASSES):
        for g in range(N_GROUPS):
            for k in range(PER_CELL + 1):
                x = rng.normal(size=(int(rng.integers(5, 12)), 4)) + offsets[g]
                x[:, c] += 2.0
                store.write_video(
                    f"v_class{c}_g{g + 1:02d}_c{k + 1:02d}",
                    {"appearance": x},
                    label=f"class{c}",
                    split="test" if k == PER_CELL else "train",
                    group=f"g{g + 1:02d}" if with_groups else None,
                )
    return str(path)


@pytest.fixture(scope="module")
def grouped_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _write_grouped_store(tmp_path_factory.mktemp("groups") / "store.zarr")


def test_grouped_holdout_keeps_every_group_on_one_side() -> None:
    labels = np.repeat(np.arange(3), 20)
    groups = [f"s{i % 7}" for i in range(60)]
    folds = grouped_holdout(labels, groups, 0.2, seed=0)
    assert len(folds) == 5  # one fold per fifth, at most one per group
    seen: set[int] = set()
    for fold in folds:
        assert len(fold) and not seen & set(fold.tolist())
        seen |= set(fold.tolist())
        held = {groups[i] for i in fold}
        rest = {groups[i] for i in range(60) if i not in set(fold.tolist())}
        assert not held & rest
    assert seen == set(range(60))
    assert grouped_holdout(labels, groups, 0.2, seed=0)[0].tolist() == folds[0].tolist()
    assert grouped_holdout(labels, groups, 0.0, seed=0) == []
    assert grouped_holdout(labels, ["one"] * 60, 0.2, seed=0) == []
    assert len(grouped_holdout(labels, groups, 0.05, seed=0)) == 7  # no more folds than groups


def test_video_groups_from_the_store_or_a_pattern(grouped_store: str) -> None:
    store = FeatureStore.open(grouped_store, "r")
    ids = store.videos(split="train")
    groups, source = video_groups(store, ids, "auto")
    assert source == "store" and groups == [v.split("_")[2] for v in ids]
    assert video_groups(store, ids, "none") == (None, None)
    by_id, pattern = video_groups(store, ids, "_(g[0-9]+)_")
    assert by_id == groups and pattern == "_(g[0-9]+)_"
    with pytest.raises(ValueError, match=r"does not match video id 'v_class0_g01_c01'"):
        video_groups(store, ids, "_(x[0-9]+)_")
    with pytest.raises(ValueError, match=r"val_groups '_\(g' is not a regular expression"):
        video_groups(store, ids, "_(g")


def test_some_videos_without_a_group_fall_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_grouped_store(tmp_path / "store.zarr", with_groups=False)
    store = FeatureStore.open(path, "r+")
    assert video_groups(store, store.videos(split="train"), "auto") == (None, None)
    first = store.videos(split="train")[0]
    store.update_video_attrs(first, group="g01")
    assert store.groups([first]) == ["g01"]
    with caplog.at_level(logging.WARNING):
        assert video_groups(store, store.videos(split="train"), "auto") == (None, None)
    assert "35 of 36 training videos have no group" in caplog.text


def test_the_validation_part_and_every_selection_fold_hold_out_whole_groups(
    grouped_store: str, tmp_path: Path
) -> None:
    """36 training videos of 6 subjects: the validation part is one or two whole subjects,
    and the further folds of the selection are other whole subjects. A stratified random part
    (what ``none`` gives) mixes subjects across the two sides."""
    store = FeatureStore.open(grouped_store, "r")
    splits = labelled_splits(store, "train", "test", val_fraction=0.1, seed=0)
    assert splits.group_by == "store" and splits.n_groups == N_GROUPS
    fit_groups = {v.split("_")[2] for v in splits.fit_ids}
    val_groups = {v.split("_")[2] for v in splits.val_ids}
    assert val_groups and not fit_groups & val_groups
    random = labelled_splits(store, "train", "test", val_fraction=0.1, seed=0, val_groups="none")
    assert random.group_by is None and random.more_folds == ()
    assert {v.split("_")[2] for v in random.val_ids} & {v.split("_")[2] for v in random.fit_ids}

    config = TrainConfig(head="gap", device="cpu", threads=1, min_validation=30, max_folds=3)
    model = build(config, {"appearance": 4}, N_CLASSES)
    data = prepare_data(store, config, model.input_specs, pyramid_leaf_streams(model))
    folds = selection_folds(data, config)
    assert len(folds) == 3
    held: list[set[str]] = []
    for fold in folds:
        fit = {data.video_ids[r].split("_")[2] for r in fold.fit}
        val = {data.video_ids[r].split("_")[2] for r in fold.val}
        assert val and not fit & val
        assert set(fold.fit.tolist()) | set(fold.val.tolist()) == set(data.rows_train.tolist())
        held.append(val)
    assert not (held[0] & held[1] or held[1] & held[2] or held[0] & held[2])


def test_a_run_records_how_its_validation_was_held_out(grouped_store: str, tmp_path: Path) -> None:
    from aggregator.train import train_run

    metrics = train_run(
        grouped_store,
        tmp_path / "run",
        head="gap",
        lr=1e-2,
        weight_decay=1e-4,
        steps=20,
        device="cpu",
        threads=1,
        make_plots=False,
        probe=False,
    )
    assert metrics["top1"] >= 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["splits"]["val_groups"] == "store"
    assert config["splits"]["n_groups"] == N_GROUPS
    val = {v.split("_")[2] for v in config["splits"]["validation_ids"]}
    assert val and len(val) < N_GROUPS
