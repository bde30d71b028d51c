"""The trainer's defaults: standardisation, step budget, selection, probes, fusion, summaries."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aggregator.evaluate import evaluate_run, summarize_runs
from aggregator.heads import GlobalPool, PyramidLeaves, TwoStream, build_model
from aggregator.heads.standardize import InputStandardizer
from aggregator.intervals import Intervals, node_means, pool_intervals, pyramid_mix
from aggregator.plots import plot_beta_pyramid, plot_history, text_colour
from aggregator.run_loader import TorchRun, load_run
from aggregator.train import train_run
from aggregator.train_config import TrainConfig, default_batch_size, plan_budget
from aggregator.train_loop import warmup_cosine
from api.cli import main
from storage import FeatureStore
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture
from tests.aggregator.toy_store import write_order_store

FAST: dict[str, Any] = {"threads": 1, "device": "cpu", "make_plots": False, "probe": False}
ONE = {"lr": 3e-3, "weight_decay": 1e-4}


def _shifted_copy(src: str, dst: Path, *, test_scale: float) -> str:
    """The same store, with every test video's features multiplied and shifted."""
    a = FeatureStore.open(src)
    b = FeatureStore.create(dst, extractor=a.extractor)
    for vid in a.videos():
        attrs = a.video_attrs(vid)
        feats = {s: a.read(vid, s).astype(np.float32) for s in a.streams(vid)}
        if attrs.get("split") == "test":
            feats = {s: test_scale * x + 50.0 for s, x in feats.items()}
        b.write_video(vid, feats, label=attrs["label"], split=attrs["split"])
    return str(dst)


@pytest.fixture(scope="module")
def order_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("order") / "store.zarr"
    write_order_store(path, n_train=8, n_test=4, d=6)
    return str(path)


def test_standardisation_statistics_come_from_the_training_split_only(
    order_store: str, tmp_path: Path
) -> None:
    """The statistics are those of the training videos' summaries; changing every test video
    (x 100 + 50) changes nothing in them, nor in the trained model."""
    kw: dict[str, Any] = {"head": "gap", "epochs": 2, "batch_size": 8, **FAST, **ONE}
    train_run(order_store, tmp_path / "a", **kw)
    other = _shifted_copy(order_store, tmp_path / "shifted.zarr", test_scale=100.0)
    train_run(other, tmp_path / "b", **kw)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the expected values: mean and std over the training videos' global means
    store = FeatureStore.open(order_store)
    means = np.stack(
        [
            node_means(store.read(v, "appearance").astype(np.float64), 1)[0]
            for v in store.videos(split="train")
        ]
    )
    mean = a["standardizer.mean_appearance"].numpy()
    std = a["standardizer.std_appearance"].numpy()
    np.testing.assert_allclose(mean, means.mean(0), atol=5e-3)
    np.testing.assert_allclose(std, means.std(0), rtol=1e-2)
    assert (std < 1.0).all()  # a spread of means, not the identity: the statistics are in use


def test_evaluate_and_the_service_path_apply_the_training_transform(
    order_store: str, tmp_path: Path
) -> None:
    """A loaded run standardises raw summaries with its stored statistics: its outputs are the
    unstandardised model's on hand-standardised nodes, and evaluate reproduces the test metrics."""
    run = tmp_path / "tp"
    metrics = train_run(
        order_store, run, head="tp", head_kwargs={"depth": 2}, epochs=3, batch_size=8, **FAST, **ONE
    )
    predictor = load_run(run)
    assert isinstance(predictor, TorchRun)
    state = torch.load(run / "model.pt", weights_only=True)
    mean, std = state["standardizer.mean_appearance"], state["standardizer.std_appearance"]
    plain = build_model(
        "tp", in_features={"appearance": 6}, num_classes=6, head_kwargs={"depth": 2}
    )
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("standardizer.")})
    plain.eval()
    store = FeatureStore.open(order_store)
    for vid in store.videos(split="test")[:5]:
        x = store.read(vid, "appearance")
        p = predictor.predict_proba({"appearance": x})  # what /v1/predict computes
        nodes = torch.from_numpy(pool_intervals(x, Intervals.pyramid(2)))[None]
        with torch.no_grad():
            ref = torch.softmax(plain.forward_nodes({"appearance": (nodes - mean) / std}), 1)
        np.testing.assert_allclose(p, ref[0].numpy(), rtol=1e-4, atol=1e-6)
    ev = evaluate_run(run, order_store, split="test", write=False)
    assert ev["confusion_matrix"] == metrics["confusion_matrix"]


def test_standardising_summaries_is_standardising_frames() -> None:
    """Means, maxes and pyramid leaves commute with the per-feature affine map."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(23, 4)).astype(np.float32)
    mean, std = rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    z = (x - mean) / std
    st = InputStandardizer({"appearance": 4})
    st.set_statistics("appearance", torch.from_numpy(mean), torch.from_numpy(std))
    for spec in (Intervals.pyramid(3), Intervals((1, 2, 4), "max")):
        out = st({"appearance": torch.from_numpy(pool_intervals(x, spec))[None]})["appearance"]
        assert isinstance(out, torch.Tensor)
        np.testing.assert_allclose(out[0].numpy(), pool_intervals(z, spec), atol=1e-5)
    leaves = torch.from_numpy(pool_intervals(x, Intervals((4,))))[None]
    mix = torch.from_numpy(pyramid_mix(23, 3)[None].astype(np.float32))
    mixed = st.transform("appearance", PyramidLeaves(leaves, mix))
    assert isinstance(mixed, PyramidLeaves)
    np.testing.assert_allclose(
        mixed.nodes()[0].numpy(), pool_intervals(z, Intervals.pyramid(3)), atol=1e-5
    )
    with pytest.raises(ValueError, match="4 features"):
        st.set_statistics("appearance", torch.zeros(3), torch.ones(3))


def _two_stream(fusion: str) -> TwoStream:
    torch.manual_seed(0)
    heads = {
        s: GlobalPool(in_features=3, num_classes=4, dropout=0.0, batch_norm=False)
        for s in ("appearance", "motion")
    }
    weights = {"appearance": 0.3, "motion": 0.7}
    return TwoStream(heads=heads, fusion=fusion, weights=weights).eval()  # type: ignore[arg-type]


def test_probability_fusion_is_the_reference_and_its_weights_are_identifiable() -> None:
    model = _two_stream("learned")
    nodes = {s: torch.randn(5, 1, 3) for s in model.streams}
    z = model.stream_logits(nodes)
    p = 0.3 * torch.softmax(z["appearance"], 1) + 0.7 * torch.softmax(z["motion"], 1)
    out = model.forward_nodes(nodes)
    torch.testing.assert_close(torch.softmax(out, 1), p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, torch.log(p), rtol=1e-5, atol=1e-6)
    # rescaling one stream's classifier changes the fused probabilities (on logits, a change of
    # scale could stand in for a change of w, so w meant nothing)
    with torch.no_grad():
        head = model.stream_head("appearance")
        assert isinstance(head, GlobalPool)
        head.fc.weight.mul_(5.0)
        head.fc.bias.mul_(5.0)
    assert not torch.allclose(torch.softmax(model.forward_nodes(nodes), 1), p, atol=1e-3)
    # the learned weights get a gradient from -log p_y
    y = torch.tensor([0, 1, 2, 3, 0])
    torch.nn.functional.cross_entropy(model.forward_nodes(nodes), y).backward()
    assert model.fusion_logits.grad is not None and model.fusion_logits.grad.abs().sum() > 0
    # DTPP's fixed weights stay on scores
    fixed = _two_stream("fixed")
    zf = fixed.stream_logits(nodes)
    torch.testing.assert_close(
        fixed.forward_nodes(nodes), 0.3 * zf["appearance"] + 0.7 * zf["motion"]
    )


def test_selection_picks_the_known_best_values(order_store: str, tmp_path: Path) -> None:
    """lr 1e-7 cannot move the weights in a few hundred steps and weight decay 1e3 pins them to
    zero: of the 2 x 2 grid only (1e-2, 1e-4) learns the order classes, and it is chosen."""
    metrics = train_run(
        order_store,
        tmp_path / "sel",
        head="tp",
        head_kwargs={"depth": 2},
        lr_grid=(1e-7, 1e-2),
        weight_decay_grid=(1e-4, 1e3),
        steps=120,
        batch_size=8,
        val_fraction=0.25,
        probe_start=False,  # from a random start, as the premise says
        **FAST,
    )
    sel = metrics["selection"]
    assert len(sel["grid"]) == 4
    assert sel["chosen"] == {"lr": 1e-2, "weight_decay": 1e-4}
    scores = {(g["lr"], g["weight_decay"]): g["val_top1"] for g in sel["grid"]}
    assert scores[(1e-2, 1e-4)] > max(v for k, v in scores.items() if k != (1e-2, 1e-4))
    assert metrics["training"]["refit"] and metrics["n_train"] == 48
    assert metrics["top1"] > 0.6


def test_the_budget_suits_small_and_large_datasets() -> None:
    config = TrainConfig()
    assert default_batch_size(40) == 8 and default_batch_size(270) == 33
    assert default_batch_size(13320) == 128
    small = plan_budget(config, 243, 270, 9)
    large = plan_budget(config, 8600, 9537, 9)
    for b in (small, large):
        assert b.steps == 1000
        assert b.n_configs * b.select_steps <= config.select_budget * b.steps + b.n_configs
    assert small.steps * small.batch_size / 270 > 100  # many epochs for a few hundred videos
    assert 10 < large.steps * large.batch_size / 9537 < 30
    by_epochs = plan_budget(config.replace(epochs=3), 90, 100, 9)
    assert by_epochs.steps == 3 * math.ceil(100 / by_epochs.batch_size)
    alone = plan_budget(config.replace(refit=False), 90, 100, 9)
    assert alone.select_steps == alone.steps
    with pytest.raises(ValueError, match="steps must be"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"epochz": 3})
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(100, 0.1)
    values = [f(k) for k in range(100)]
    assert values[0] < 0.2 and max(values) == pytest.approx(1.0)
    after = values[10:]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert values[-1] < 0.01
    assert warmup_cosine(10, 0.0, "constant")(9) == 1.0


def _fake_run(path: Path, head: str, top1: float, kwargs: dict[str, Any] | None = None) -> str:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(
        json.dumps(
            {"head": head, "n_test": 10, "top1": top1, "top5": 1.0, "mean_class_accuracy": top1}
        )
    )
    config = {
        "head": head,
        "head_kwargs": kwargs or {},
        "streams": ["appearance"],
        "train_args": {"seed": 0, "train_split": "train"},
    }
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_summarize_groups_by_head_and_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [
        _fake_run(tmp_path / "tp1", "tp", 0.8),
        _fake_run(tmp_path / "tp2", "tp", 0.6),
        _fake_run(tmp_path / "tp_deep", "tp", 0.9, {"depth": 6}),
        _fake_run(tmp_path / "gap", "gap", 0.5),
    ]
    summary = summarize_runs(runs)
    assert [g["n_runs"] for g in summary["groups"]] == [2, 1, 1]
    assert summary["groups"][0]["top1"]["mean"] == pytest.approx(0.7)
    assert summary["groups"][1]["top1"]["std"] is None
    assert "top1" not in summary  # several groups: no average across them
    assert main(["summarize", *runs]) == 0
    out = capsys.readouterr().out
    assert "70.00 ± 14.14" in out
    assert "(1 runs)" not in out
    assert "| tp #2 | 1 | 90.00 | 100.00 | 90.00 |" in out  # one run: its values, no "± 0.00"
    assert "| gap | 1 | 50.00 |" in out
    assert "not averaged together" in out


def test_plot_text_reads_and_beta_panels_share_a_scale(tmp_path: Path) -> None:
    assert text_colour((1.0, 1.0, 1.0, 1.0)) == "black"
    assert text_colour((0.0, 0.0, 0.3, 1.0)) == "white"
    assert text_colour((0.95, 0.9, 0.1, 1.0)) == "black"  # yellow: dark text
    beta = {"appearance": np.array([0.7, 0.2, 0.1]), "motion": np.array([0.1, 0.1, 0.8])}
    assert plot_beta_pyramid(beta, tmp_path / "b.png", title="run (tp)").is_file()
    history = [
        {"step": k, "train_loss": 1.0 / k, "train_top1": 0.5, "val_loss": 1.0, "val_top1": 0.4}
        for k in (1, 2)
    ]
    refit = [{"step": k, "train_loss": 0.5 / k, "train_top1": 0.6} for k in (1, 2)]
    assert plot_history(history, tmp_path / "h.png", title="run (tp)", refit=refit).is_file()


def test_top1_breaks_ties_as_argmax_does() -> None:
    """A model that scores every class alike is right only where argmax happens to be."""
    from aggregator.metrics import classification_metrics

    y = np.array([0, 1, 2, 2])
    m = classification_metrics(np.zeros((4, 3)), y, ["a", "b", "c"])
    assert m["top1"] == 0.25 == np.trace(np.array(m["confusion_matrix"])) / 4
    assert m["top5"] == 1.0
    scores = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 0.0, 0.0]])
    assert classification_metrics(scores, np.array([1, 0, 2, 0]), ["a", "b", "c"])["top1"] == 0.5


def test_a_small_validation_part_gets_more_folds(order_store: str, tmp_path: Path) -> None:
    """Six validation videos (one per class) are too few to choose on: two more folds of the
    same size per class are taken from the fit videos, disjoint, each standardised with its own
    fit videos only, and the grid is chosen on the pooled validation loss of 18 videos; the
    known-best value still wins."""
    from aggregator.heads.views import pyramid_leaf_streams
    from aggregator.run_data import prepare_data
    from aggregator.selection import selection_folds
    from aggregator.trainer import build

    config = TrainConfig(
        head="gap", max_folds=3, **{k: v for k, v in FAST.items() if k != "make_plots"}
    )
    probe_model = build(config, {"appearance": 1}, 2)
    store = FeatureStore.open(order_store, "r")
    data = prepare_data(store, config, probe_model.input_specs, pyramid_leaf_streams(probe_model))
    folds = selection_folds(data, config)
    assert len(folds) == 3 and data.n_val == 6
    vals = [set(f.val.tolist()) for f in folds]
    assert all(len(v) == 6 for v in vals) and not (vals[0] & vals[1] or vals[1] & vals[2])
    for f in folds:
        assert sorted(data.labels[f.val].tolist()) == list(range(6))  # one video per class
        assert set(f.fit.tolist()) | set(f.val.tolist()) == set(data.rows_train.tolist())
        assert not set(f.fit.tolist()) & set(f.val.tolist())
    for f in folds[1:]:  # statistics of the fold's own fit videos
        x = data.nodes.take(torch.as_tensor(f.fit), torch.float64)["appearance"]
        mean, _ = data.stats[f.stats_key]["appearance"]
        assert torch.allclose(mean.double(), x.reshape(-1, x.shape[-1]).mean(0), atol=1e-4)
    assert len(selection_folds(data, config.replace(max_folds=1))) == 1
    assert len(selection_folds(data, config.replace(min_validation=6))) == 1

    metrics = train_run(
        order_store,
        tmp_path / "sel",
        head="tp",
        head_kwargs={"depth": 2},
        lr_grid=(1e-7, 1e-2),
        weight_decay_grid=(1e-4, 1e3),
        steps=120,
        batch_size=8,
        max_folds=3,
        probe_start=False,  # the grid's choice itself, from a random start
        **FAST,
    )
    sel = metrics["selection"]
    assert sel["folds"] == 3 and sel["validation_videos"] == 18
    assert sel["chosen"] == {"lr": 1e-2, "weight_decay": 1e-4}
    losses = {(g["lr"], g["weight_decay"]): g["val_loss"] for g in sel["grid"]}
    assert losses[(1e-2, 1e-4)] < min(v for k, v in losses.items() if k != (1e-2, 1e-4))
    assert all(len(g["fold_val_top1"]) == 3 for g in sel["grid"])


def test_gap_on_standardised_inputs_has_no_batch_norm(order_store: str, tmp_path: Path) -> None:
    """On standardised global means ``gap`` is the global-mean probe's model (a multinomial
    logistic regression): batch norm only adds batch noise there. Kept without
    standardisation, where it is the only normalisation, when the user sets it, and for
    ``max``. The choice is recorded, so the run reloads with the same model."""
    from aggregator.trainer import resolve_batch_norm

    gap = TrainConfig(head="gap")
    assert resolve_batch_norm(gap).head_kwargs == {"batch_norm": False}
    assert resolve_batch_norm(gap.replace(standardize=False)).head_kwargs == {}
    kept = gap.replace(head_kwargs={"batch_norm": True})
    assert resolve_batch_norm(kept).head_kwargs == {"batch_norm": True}
    assert resolve_batch_norm(TrainConfig(head="max")).head_kwargs == {}
    out = tmp_path / "gap"
    metrics = train_run(order_store, out, head="gap", steps=30, **ONE, **FAST)
    config = json.loads((out / "config.json").read_text())
    assert config["head_kwargs"]["batch_norm"] is False
    run = load_run(out)
    assert isinstance(run, TorchRun)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in run.model.modules())
    again = evaluate_run(out, order_store, split="test", write=False)
    assert again["top1"] == pytest.approx(metrics["top1"])
