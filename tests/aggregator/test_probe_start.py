"""Heads start from their linear probe and are chosen against it (5 videos per class)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
import torch

from aggregator.heads import TwoStream, build_model
from aggregator.metrics import chance_warnings
from aggregator.probe import _probe_pipeline, fit_linear_probe
from aggregator.probe_start import (
    model_probe_name,
    pass_loss_error,
    probe_columns,
    resolve_tpp_bins,
    start_from_probe,
    trained_head_wins,
)
from aggregator.run_loader import load_run
from aggregator.rundir import further_folds
from aggregator.svm.predictor import SVMPredictor
from aggregator.svm.run import train_svm
from aggregator.train import train_run
from aggregator.train_config import TrainConfig
from api.cli.train_cmd import format_summary
from storage import FeatureStore
from tests.aggregator.toy_store import write_burst_store

FAST: dict[str, Any] = {"threads": 1, "device": "cpu", "make_plots": False}


def _reference(x: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Probabilities of scikit-learn's standardised logistic regression (the probe itself)."""
    model = _probe_pipeline(0).fit(x.astype(np.float32), y)
    proba = np.zeros((len(test), int(y.max()) + 1))
    proba[:, model.classes_] = model.predict_proba(test.astype(np.float32))
    return proba


@pytest.mark.parametrize(
    ("head", "kwargs", "n_classes"),
    [
        ("gap", {"batch_norm": False}, 4),
        ("gap", {"batch_norm": True}, 2),
        ("tp", {"depth": 3, "variant": "concat", "node_dim": 8}, 3),
        ("tpp", {"levels": (1, 2), "pooling": "average"}, 2),
    ],
)
def test_the_start_is_the_probe(head: str, kwargs: dict[str, Any], n_classes: int) -> None:
    """A head that can represent its probe, started from it, outputs the probe's probabilities
    on new videos (the standardised logistic regression of scikit-learn on the same summaries,
    as a run's probe fits it): the classifier, the projection, the batch norm and beta are
    set, not approximated."""
    rng = np.random.default_rng(0)
    d, n = 5, 40
    model = build_model(
        head, in_features={"appearance": d}, num_classes=n_classes, head_kwargs=kwargs,
        standardize=True,
    )  # fmt: skip
    m = model.input_specs["appearance"].count
    y = np.arange(n) % n_classes
    nodes = rng.normal(size=(n + 10, m, d)) * 3.0 + 1.0
    nodes[:n, :, 0] += y[:, None]  # the class shows in feature 0 of every node
    assert model.standardizer is not None
    flat = nodes.reshape(-1, d)
    model.standardizer.set_statistics(
        "appearance", torch.tensor(flat.mean(0)), torch.tensor(flat.std(0))
    )
    x = torch.tensor(nodes, dtype=torch.float32)
    assert start_from_probe(model, {"appearance": x[:n]}, y) == model_probe_name(model)
    model.eval()
    with torch.no_grad():
        proba = torch.softmax(model.forward_nodes({"appearance": x[n:]}), 1).numpy()
    count = 1 if head == "gap" else m  # gap's probe reads the global mean only
    summaries = nodes[:, :count].reshape(len(nodes), -1)
    expected = _reference(summaries[:n], y, summaries[n:])
    np.testing.assert_allclose(proba, expected, atol=2e-3)


@pytest.mark.parametrize(
    ("head", "kwargs"),
    [
        ("tp", {"depth": 4, "variant": "concat", "node_dim": 8}),
        ("tpp", {"levels": (1, 2, 4, 8), "pooling": "average"}),
    ],
)
def test_the_start_is_the_node_mean_probe_of_the_run(head: str, kwargs: dict[str, Any]) -> None:
    """A head with more levels than the run's node-mean probe starts from that probe (the
    baseline it is held against), not from a probe on all its own nodes: the finer nodes get
    zero weight and the head outputs the probe's probabilities on new videos."""
    rng = np.random.default_rng(2)
    d, n, levels = 4, 36, 2
    model = build_model(
        head, in_features={"appearance": d}, num_classes=3, head_kwargs=kwargs, standardize=True
    )
    m = model.input_specs["appearance"].count
    y = np.arange(n) % 3
    nodes = rng.normal(size=(n + 12, m, d)) + 0.5
    nodes[:n, :3, 1] += 0.7 * y[:, None]  # the class shows in the coarse nodes
    nodes[:n, 3:, 2] += 2.0 * y[:, None]  # and, more clearly, in the finer ones
    assert model.standardizer is not None
    flat = nodes.reshape(-1, d)
    model.standardizer.set_statistics(
        "appearance", torch.tensor(flat.mean(0)), torch.tensor(flat.std(0))
    )
    x = torch.tensor(nodes, dtype=torch.float32)
    assert start_from_probe(model, {"appearance": x[:n]}, y, levels=levels) == "pyramid_nodes"
    assert isinstance(model, TwoStream)
    stream = model.stream_head("appearance")
    columns = probe_columns(stream, levels)
    assert len(columns) == stream.feature_dim * 3 // m
    fc = stream.fc
    assert isinstance(fc, torch.nn.Linear)
    assert torch.count_nonzero(fc.weight.detach()[:, len(columns) :]) == 0
    model.eval()
    with torch.no_grad():
        proba = torch.softmax(model.forward_nodes({"appearance": x[n:]}), 1).numpy()
    summaries = nodes[:, :3].reshape(len(nodes), -1)  # the 2-level pyramid: nodes 1-3
    expected = _reference(summaries[:n], y, summaries[n:])
    np.testing.assert_allclose(proba, expected, atol=2e-3)


def test_a_trained_head_must_lead_its_start_by_more_than_the_noise() -> None:
    """The one-standard-error rule against the start: a lower pooled loss within one standard
    error of the head's loss is a draw, which the start wins; so is a higher top-1 alone."""
    start = {"val_top1": 0.6, "val_loss": 1.0}
    assert not trained_head_wins(start, 0.7, 0.9, 0.15)  # 0.1 lower, standard error 0.15
    assert trained_head_wins(start, 0.7, 0.8, 0.15)
    assert not trained_head_wins(start, 0.6, 0.5, 0.01)  # no more videos right
    assert trained_head_wins(start, 0.7, 0.9, float("nan"))  # unknown error: no margin
    history = [{"step": 5, "val_loss": 1.0, "val_loss_sq": 1.25}, {"step": 10, "val_loss": 2.0}]
    assert pass_loss_error(history, 5, 25) == pytest.approx(0.1)  # sqrt(0.25 / 25)
    assert np.isnan(pass_loss_error(history, 10, 25))


def test_heads_that_cannot_represent_a_probe_are_left_alone() -> None:
    for head, kwargs in (("max", {}), ("datp", {}), ("tp", {"variant": "average", "depth": 2})):
        model = build_model(head, in_features={"appearance": 4}, num_classes=3, head_kwargs=kwargs)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        spec = model.input_specs["appearance"]
        x = {"appearance": torch.randn(12, spec.count, 4)}
        assert start_from_probe(model, x, np.arange(12) % 3) is None
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_probe_folds_its_scaler_and_names_unseen_classes_last() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)) * [1.0, 10.0, 0.1] + 5.0, np.arange(30) % 3
    x[:, 0] += y
    probe = fit_linear_probe(x, y)
    w, b = probe.logits(4)  # class 3 has no training video
    proba = torch.softmax(torch.tensor(x @ w.T + b), 1).numpy()
    np.testing.assert_allclose(proba[:, :3], _reference(x, y, x)[:, :3], atol=1e-4)
    assert (proba[:, 3] < 1e-4).all()


@pytest.fixture(scope="module")
def five_per_class(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six classes, 5 training videos each (the global mean tells them apart)."""
    path = tmp_path_factory.mktemp("five") / "store.zarr"
    write_burst_store(path, n_train=5, n_test=10, d=6, streams=("appearance",))
    return str(path)


# a budget that leaves a randomly started head where it began: training would lose to the probe
HARMFUL: dict[str, Any] = {"lr_grid": (1e-7,), "weight_decay_grid": (0.0, 1e-4), "steps": 20}


def test_selection_keeps_the_probe_start_where_training_loses(
    five_per_class: str, tmp_path: Path
) -> None:
    """On 5 videos per class with a budget too small to learn anything, ``gap`` started from
    the global-mean probe keeps that start (recorded, with both validation scores) and scores
    the probe's own test top-1; from a random start the same training scores far below it,
    and the run says that the probe validates better."""
    kept = train_run(five_per_class, tmp_path / "kept", head="gap", **HARMFUL, **FAST)
    check = kept["probe_check"]
    assert check["probe"] == "global_mean" and check["kept"] == "probe start"
    assert check["val_top1"] >= check["head_val_top1"] and check["videos"] >= 18
    assert kept["top1"] == pytest.approx(kept["probe"]["global_mean"]["top1"], abs=1e-9)
    assert kept["training"]["steps"] == 0
    lost = train_run(
        five_per_class, tmp_path / "lost", head="gap", probe_start=False, **HARMFUL, **FAST
    )
    assert lost["top1"] < kept["top1"] - 0.1
    assert lost["warnings"] and "probe validates better" in lost["warnings"][0]


def test_tp_keeps_the_run_s_node_mean_probe_where_training_loses(
    five_per_class: str, tmp_path: Path
) -> None:
    """``tp`` concat of 3 levels, held against the 2-level node-mean probe, starts from that
    probe; where training cannot beat it by more than the noise it ships that probe, and scores
    the probe's own test top-1."""
    metrics = train_run(
        five_per_class,
        tmp_path / "tp",
        head="tp",
        head_kwargs={"depth": 3, "variant": "concat", "node_dim": 8},
        probe_levels=2,
        **HARMFUL,
        **FAST,
    )
    check = metrics["probe_check"]
    assert check["probe"] == "pyramid_nodes" and check["kept"] == "probe start"
    assert "head_val_loss_se" in check
    assert metrics["top1"] == pytest.approx(metrics["probe"]["pyramid_nodes"]["top1"], abs=1e-9)


def test_tpp_pools_the_probe_s_node_means_unless_told_otherwise(
    five_per_class: str, tmp_path: Path
) -> None:
    """``tpp`` with no pooling or levels given reads the node means of the run's probe
    pyramid, so its start is the node-mean probe itself; where training loses it ships that
    probe. Given a pooling or levels, the head's own defaults fill in the rest."""
    assert resolve_tpp_bins(TrainConfig(head="tpp", probe_levels=3)).head_kwargs == {
        "pooling": "average",
        "levels": (1, 2, 4),
    }
    assert resolve_tpp_bins(TrainConfig(head="tpp", head_kwargs={"pooling": "max"})).head_kwargs
    assert resolve_tpp_bins(
        TrainConfig(head="tpp", head_kwargs={"levels": (1, 2)})
    ).head_kwargs == {"levels": (1, 2)}
    with patch("aggregator.probe_start.MAX_FLOATS", 6 * 5 * 3 * 6 - 1):  # 30 videos, d = 6
        store = FeatureStore.open(five_per_class)
        assert resolve_tpp_bins(TrainConfig(head="tpp", probe_levels=2), store).head_kwargs == {}
    metrics = train_run(
        five_per_class, tmp_path / "tpp", head="tpp", probe_levels=2, **HARMFUL, **FAST
    )
    check = metrics["probe_check"]
    assert check["probe"] == "pyramid_nodes" and check["kept"] == "probe start"
    assert metrics["top1"] == pytest.approx(metrics["probe"]["pyramid_nodes"]["top1"], abs=1e-9)
    config = json.loads((tmp_path / "tpp" / "config.json").read_text())
    assert config["train_args"]["head_kwargs"]["pooling"] == "average"
    predictor = load_run(tmp_path / "tpp")  # the recorded bins build the same head again
    vid = store.videos(split="test")[0]
    proba = predictor.predict_proba({"appearance": store.read(vid, "appearance")})
    assert proba.shape == (6,) and abs(proba.sum() - 1) < 1e-6


def test_a_head_without_a_probe_says_when_the_probe_is_better(
    five_per_class: str, tmp_path: Path
) -> None:
    metrics = train_run(five_per_class, tmp_path / "max", head="max", **HARMFUL, **FAST)
    check = metrics["probe_check"]
    assert check["probe_better"] is True
    assert (
        max(check["global_mean"]["val_top1"], check["pyramid_nodes"]["val_top1"])
        > check["head_val_top1"]
    )
    assert any("probe validates better" in w for w in metrics["warnings"])


def test_the_svm_keeps_the_node_mean_probe_where_it_validates_better(
    five_per_class: str, tmp_path: Path
) -> None:
    """A soft margin so small that the SVM barely learns: the node-mean probe validates better,
    becomes the stream's model (beta uniform), scores the probe's test top-1 and loads back."""
    metrics = train_svm(
        five_per_class,
        tmp_path / "svm",
        streams=["appearance"],
        levels=2,
        variant="concat",
        C=1e-6,
        kernel="linear",
        train_split="train",
        test_split="test",
        seed=0,
        max_iter=5,
        eps=1e-2,
        probe_levels=2,
    )
    check = metrics["probe_check"]["appearance"]
    assert check["kept"] == "probe" and check["val_top1"] >= check["svm_val_top1"]
    assert metrics["top1"] == pytest.approx(metrics["probe"]["pyramid_nodes"]["top1"], abs=1e-9)
    summary = format_summary(metrics, str(tmp_path / "svm"))
    assert "appearance 2 levels node-mean probe" in summary and "kept the probe" in summary
    predictor = SVMPredictor.load(tmp_path / "svm")
    store = FeatureStore.open(five_per_class)
    vid = store.videos(split="test")[0]
    proba = predictor.predict_proba({"appearance": store.read(vid, "appearance")})
    assert proba.shape == (6,) and abs(proba.sum() - 1) < 1e-6


def test_small_splits_get_repeated_stratified_folds() -> None:
    """5 videos per class, one per class validating: three disjoint folds, then folds from
    seeded reshuffles of all training videos, each with one video per class and every class
    keeping videos to fit on."""
    labels = np.repeat(np.arange(3), 5)
    val = np.array([0, 5, 10])
    fit = np.setdiff1d(np.arange(15), val)
    folds = further_folds(labels, fit, val, None, min_validation=100, max_folds=7, seed=3)
    assert len(folds) == 6
    disjoint = np.concatenate([val, *folds[:3]])
    assert len(set(disjoint.tolist())) == 12
    for fold in folds:
        assert sorted(labels[fold].tolist()) == [0, 1, 2]
    again = further_folds(labels, fit, val, None, min_validation=100, max_folds=7, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))


def test_chance_is_reported() -> None:
    assert chance_warnings({"top1": 0.5, "n_test": 10}, 2)
    assert not chance_warnings({"top1": 0.6, "n_test": 10}, 2)
    assert not chance_warnings({"top1": 0.0, "n_test": 0}, 2)
