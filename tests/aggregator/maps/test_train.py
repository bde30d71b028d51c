"""Training ``stpn`` on map streams: the padded map loader, the synthetic task, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.maps.data import MapDataset, map_loader, pad_maps, pick_frames
from aggregator.maps.synthetic import LocationTask, quadrant_cells, write_location_store
from api.cli import main
from storage import FeatureStore

TINY = LocationTask(grid=3, channels=4, frames=(1, 4), map_stride=2)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loc") / "loc.zarr"
    write_location_store(path, train_per_class=3, test_per_class=1, task=TINY)
    return path


def test_location_store_maps_and_pooled_streams_agree(tiny_store: Path) -> None:
    store = FeatureStore.open(tiny_store)
    assert len(store.videos(split="train")) == 12 and len(store.videos(split="test")) == 4
    lengths = set()
    for vid in store.videos():
        app, fmap = store.read(vid, "appearance"), store.read(vid, "appearance_map")
        assert fmap.shape == (len(range(0, len(app), 2)), 3, 3, 4)
        np.testing.assert_allclose(fmap.mean(axis=(1, 2)), app[::2], atol=2e-3)
        motion = np.abs(store.read(vid, "motion_map")).sum(axis=(0, 3))  # [3, 3]
        label = store.video_attrs(vid)["label"]
        k = ["top_left", "top_right", "bottom_left", "bottom_right"].index(label)
        assert tuple(np.unravel_index(motion.argmax(), motion.shape)) in quadrant_cells(3, k)
        lengths.add(len(app))
    assert len(lengths) > 1  # mixed lengths


def test_quadrants_leave_out_the_middle() -> None:
    cells = [set(quadrant_cells(5, k)) for k in range(4)]
    assert all(len(c) == 4 for c in cells)
    middle = {(2, j) for j in range(5)} | {(i, 2) for i in range(5)}
    assert not set.union(*cells) & middle
    assert len(set.union(*cells)) == 16


def test_pad_maps_pads_and_masks() -> None:
    items = [
        {
            "features": {"m": torch.ones(n, 2, 2, 3, dtype=torch.float16)},
            "label": n,
            "video_id": str(n),
        }
        for n in (3, 1)
    ]
    batch = pad_maps(items)
    assert batch.features["m"].shape == (2, 3, 2, 2, 3)
    assert batch.features["m"].dtype == torch.float32
    assert batch.lengths.tolist() == [3, 1] and batch.labels.tolist() == [3, 1]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.features["m"][1, 1:].abs().sum() == 0
    bad = [items[0], {**items[1], "features": {"m": torch.ones(1, 2, 3, 3)}}]
    with pytest.raises(ValueError, match="expected"):
        pad_maps(bad)


def test_map_dataset_subsamples_and_holds(tiny_store: Path) -> None:
    store = FeatureStore.open(tiny_store)
    ids = store.videos(split="train")
    data = MapDataset(store, ids, max_frames=1, in_memory=True)
    batch = next(iter(map_loader(data, batch_size=4)))
    assert batch.lengths.tolist() == [1, 1, 1, 1]
    assert data[0]["features"]["appearance_map"] is data[0]["features"]["appearance_map"]
    assert pick_frames(10, 4).tolist() == [0, 3, 6, 9] and pick_frames(3, None).tolist() == [
        0,
        1,
        2,
    ]
    with pytest.raises(ValueError, match="not a"):
        MapDataset(store, ids, ["appearance"])[0]


def test_cli_trains_and_evaluates_stpn(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--store", str(tiny_store), "--head", "stpn", "--out", str(out)]
    args += ["--epochs", "2", "--batch-size", "4", "--out-dim", "64", "--device", "cpu"]
    args += ["--pathways", "spatial,temporal,attended,fused"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"] == "stpn" and metrics["n_test"] == 4
    assert 0.0 <= metrics["top1"] <= 1.0 and len(metrics["history"]) == 2
    assert {"attention.png", "confusion.png", "training_curves.png"} <= set(metrics["plots"])
    config = json.loads((out / "config.json").read_text())
    assert config["streams"] == ["appearance_map", "motion_map"]
    assert config["in_features"] == {"appearance_map": 4, "motion_map": 4}
    assert config["head_kwargs"]["pathways"] == ["spatial", "temporal", "attended", "fused"]
    state = torch.load(out / "model.pt", weights_only=True)
    assert "attention.conv1.weight" in state and "fused_norm.weight" in state
    # the run's fused representations of the training videos answer /v1/similar like any head's
    from aggregator.similarity import SimilarityIndex

    index = SimilarityIndex.load(out)
    assert len(index) == len(FeatureStore.open(tiny_store, "r").videos(split="train"))
    # evaluate reads the map streams; the test split again gives the run's own test metrics
    assert main(["evaluate", "--run", str(out), "--store", str(tiny_store)]) == 0
    evaluation = json.loads((out / "evaluation-test.json").read_text())
    assert evaluation["top1"] == metrics["top1"] and evaluation["head"] == "stpn"
    assert evaluation["confusion_matrix"] == metrics["confusion_matrix"]
    assert main(["train", "--store", str(tiny_store), "--head", "stpn", "--out", str(out),
                 "--levels", "3"]) == 2  # fmt: skip
    assert main(["train", "--store", str(tiny_store), "--head", "stpn", "--out", str(out),
                 "--pathways", "spatial,nodes"]) == 2  # fmt: skip


def test_stpn_validation_holds_out_groups(tiny_store: Path, tmp_path: Path) -> None:
    """``--val-groups`` reaches the map trainer: a pattern's groups (the clip number) are held
    out whole, and the run records how."""
    out = tmp_path / "run"
    pattern = "_([0-9]{4})$"
    args = ["train", "--store", str(tiny_store), "--head", "stpn", "--out", str(out)]
    args += ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-plots"]
    assert main([*args, "--val-groups", pattern]) == 0
    splits = json.loads((out / "config.json").read_text())["splits"]
    assert splits["val_groups"] == pattern and splits["n_groups"] == 3
    assert len({v[-4:] for v in splits["validation_ids"]}) == 1
    assert len(splits["validation_ids"]) == 4  # one clip number, all four classes


def test_stpn_on_a_store_without_maps_names_the_fix(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "v.zarr", class_names=["a", "b"])
    for i in range(4):
        label = "ab"[i % 2]
        store.write_video(f"v{i}", {"appearance": np.ones((3, 4))}, label=label, split="train")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="appearance_map,motion_map"):
        from aggregator.trainers import train

        train(tmp_path / "v.zarr", out, head="stpn", test_split=None, epochs=1)


@pytest.mark.slow
def test_stpn_sees_where_the_motion_is_and_pooled_heads_do_not(tmp_path: Path) -> None:
    from aggregator.trainers import train

    task = LocationTask(grid=5, channels=16, frames=(4, 8))
    write_location_store(tmp_path / "loc.zarr", train_per_class=60, test_per_class=25, task=task)
    common = {"epochs": 12, "batch_size": 16, "patience": None, "make_plots": False}
    stpn = train(
        tmp_path / "loc.zarr",
        tmp_path / "stpn",
        head="stpn",
        head_kwargs={
            "out_dim": 1024,
            "temporal_dim": 128,
            "attention_dim": 64,
            "pathways": ("spatial", "temporal", "attended", "fused"),
        },
        **common,  # type: ignore[arg-type]
    )
    stcb = train(
        tmp_path / "loc.zarr",
        tmp_path / "stcb",
        head="stcb",
        streams=["appearance", "motion"],
        head_kwargs={"out_dim": 1024},
        **common,  # type: ignore[arg-type]
    )
    assert stcb["top1"] < 0.4, stcb["top1"]  # chance is 0.25: pooled vectors carry no location
    assert stpn["top1"] >= 0.45 and stpn["top1"] >= stcb["top1"] + 0.15, (
        stpn["top1"],
        stcb["top1"],
    )


def _pooled_class_store(path: Path) -> Path:
    """Three classes told apart by an offset of every cell of the maps, so that the pooled
    streams (the maps' spatial means) carry the class and their probes validate well."""
    rng = np.random.default_rng(0)
    store = FeatureStore.create(path, class_names=["a", "b", "c"])
    for i in range(36):
        c, t = i % 3, int(rng.integers(2, 5))
        maps = {s: rng.normal(size=(t, 2, 2, 4)) + 2.0 * c for s in ("appearance", "motion")}
        store.write_video(
            f"v{i:02d}",
            {**{s: m.mean(axis=(1, 2)) for s, m in maps.items()},
             **{f"{s}_map": m for s, m in maps.items()}},
            label="abc"[c],
            split="train" if i < 24 else "test",
        )  # fmt: skip
    return path


def test_stpn_is_checked_against_the_pooled_streams_probes(tmp_path: Path) -> None:
    """stpn cannot represent a probe: the global-mean and node-mean probes of the pooled
    streams are scored on its validation videos, recorded, and a warning says when one is
    better (here: an untrained head against probes that see the class in every video)."""
    from aggregator.maps.train import train_map_run

    store = _pooled_class_store(tmp_path / "pooled.zarr")
    metrics = train_map_run(
        store, tmp_path / "run", epochs=1, lr=1e-12, batch_size=4, val_fraction=0.3,
        device="cpu", make_plots=False, head_kwargs={"out_dim": 32},
    )  # fmt: skip
    check = metrics["probe_check"]
    assert check["streams"] == ["appearance", "motion"] and check["probe_better"] is True
    assert check["global_mean"]["val_top1"] == 1.0 and check["global_mean"]["videos"] >= 6
    assert check["head_val_top1"] == metrics["val_top1"] < 1.0
    assert any("probe validates better" in w for w in metrics["warnings"])
    assert metrics["probe"]["global_mean"]["top1"] == 1.0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["probe_check"]["best_probe"] == check["best_probe"]
