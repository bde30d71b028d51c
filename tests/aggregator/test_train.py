"""The trainer end to end on tiny synthetic stores: what it learns, writes, and reloads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aggregator.data import load_node_tensors
from aggregator.evaluate import evaluate_run, summarize_runs
from aggregator.heads import build_model
from aggregator.predictor import Predictor
from aggregator.run_loader import TorchRun, load_run
from aggregator.train import train_run
from aggregator.trainers import retrain
from api.cli import main
from extractor.runtime import bf16_supported, resolve_precision
from storage import FeatureStore
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture
from tests.aggregator.toy_store import write_burst_store, write_order_store

FAST = {"threads": 1, "batch_size": 16, "device": "cpu", "probe": False}
ONE = {"lr": 3e-3, "weight_decay": 1e-4}  # one configuration: no selection grid
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def order_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("order") / "store.zarr"
    write_order_store(path, n_train=12, n_test=10, streams=("appearance", "motion"))
    return str(path)


@pytest.fixture(scope="module")
def tp_run(order_store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tp"
    rc = main(
        [
            "train",
            "--store",
            order_store,
            "--head",
            "tp",
            "--levels",
            "3",
            "--stream",
            "both",
            "--out",
            str(out),
            "--epochs",
            "25",
            "--batch-size",
            "16",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--no-probe-start",  # the refit's mechanics, from a random start
        ]
    )
    assert rc == 0
    return out


def test_tp_learns_temporal_order_and_gap_cannot(order_store: str, tmp_path: Path) -> None:
    """Classes differ only in the order of three equal thirds: the mean over frames is the same
    for all six, so gap stays at chance (1/6) while a 3-level pyramid separates them."""
    kw: dict[str, Any] = {"streams": ["appearance"], "epochs": 40, "seed": 0, **FAST, **ONE}
    kw["make_plots"] = False
    tp = train_run(order_store, tmp_path / "tp", head="tp", head_kwargs={"depth": 3}, **kw)
    gap = train_run(order_store, tmp_path / "gap", head="gap", **kw)
    assert tp["n_test"] == gap["n_test"] == 60
    assert tp["top1"] >= 0.9, tp["top1"]
    assert gap["top1"] <= 0.4, gap["top1"]  # chance 0.167, sd 0.048 at n = 60
    assert tp["mean_class_accuracy"] >= 0.9


def test_cli_writes_a_complete_run_directory(tp_run: Path, order_store: str) -> None:
    for name in ("config.json", "model.pt", "metrics.json"):
        assert (tp_run / name).is_file(), name
    for name in ("beta_pyramid.png", "training_curves.png", "confusion.png"):
        assert (tp_run / name).read_bytes()[:8] == PNG, name
    metrics = json.loads((tp_run / "metrics.json").read_text())
    for key in ("top1", "top5", "mean_class_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    # refit on the whole training split after choosing on its validation part
    assert metrics["n_test"] == 60 and metrics["n_train"] == 72 and metrics["n_val"] == 6
    assert metrics["training"]["refit"] and metrics["refit_history"]
    assert metrics["seconds"] > 0 and metrics["history"][-1]["step"] > 0
    assert "val_top1" in metrics["history"][-1]
    # every grid point with its validation score; the chosen one is the best of them
    grid = metrics["selection"]["grid"]
    assert len(grid) == 9 and all(g["val_top1"] is not None for g in grid)
    best = max(grid, key=lambda g: (g["val_top1"], -g["val_loss"]))
    assert metrics["selection"]["chosen"] == {k: best[k] for k in ("lr", "weight_decay")}
    # the linear-probe references of the same videos
    probe = metrics["probe"]
    assert 0 <= probe["global_mean"]["top1"] <= 1 and probe["pyramid_nodes"]["levels"] == 4
    assert probe["pyramid_nodes"]["top1"] > probe["global_mean"]["top1"]  # order: not in the mean
    assert np.array(metrics["confusion_matrix"]).sum() == 60
    assert set(metrics["per_class_accuracy"]) == {f"order{c}" for c in range(6)}
    assert set(metrics["beta"]) == {"appearance", "motion"}
    for levels in metrics["beta"].values():
        assert [len(lv) for lv in levels] == [1, 2, 4]
        assert math.isclose(sum(map(sum, levels)), 1.0, rel_tol=1e-6)
    assert math.isclose(sum(metrics["fusion_weights"].values()), 1.0, rel_tol=1e-6)
    assert set(metrics["per_stream"]) == {"appearance", "motion"}

    config = json.loads((tp_run / "config.json").read_text())
    assert config["head"] == "tp" and config["head_kwargs"] == {"depth": 3}
    assert config["standardize"] is True
    assert config["streams"] == ["appearance", "motion"]
    assert config["store"] == order_store
    assert config["extractor"] == FeatureStore.open(order_store).extractor
    assert config["class_names"] == [f"order{c}" for c in range(6)]
    assert config["splits"]["train"] == "train" and config["splits"]["test"] == "test"
    assert config["seed"] == 0
    # validation is carved from the training split only
    train_ids = set(FeatureStore.open(order_store).videos(split="train"))
    assert set(config["splits"]["validation_ids"]) <= train_ids
    assert len(config["splits"]["validation_ids"]) == metrics["n_val"] == 6

    state = torch.load(tp_run / "model.pt", weights_only=True)
    model = build_model(
        "tp",
        in_features=config["in_features"],
        num_classes=6,
        head_kwargs=config["head_kwargs"],
        standardize=True,
    )
    model.load_state_dict(state)


def test_load_run_predicts_what_evaluation_counted(tp_run: Path, order_store: str) -> None:
    predictor = load_run(tp_run)
    assert isinstance(predictor, Predictor) and isinstance(predictor, TorchRun)
    assert predictor.streams == ["appearance", "motion"]
    store = FeatureStore.open(order_store)
    ids = store.videos(split="test")
    metrics = json.loads((tp_run / "metrics.json").read_text())
    confusion = np.zeros((6, 6), dtype=int)
    probs = []
    for vid in ids:
        p = predictor.predict_proba({s: store.read(vid, s) for s in predictor.streams})
        assert p.shape == (6,) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)
        probs.append(p)
        confusion[predictor.class_names.index(store.video_attrs(vid)["label"]), p.argmax()] += 1
    np.testing.assert_array_equal(confusion, metrics["confusion_matrix"])
    # per-video frames and the cached nodes give the same probabilities (float16 cache)
    y = np.zeros(len(ids), dtype=np.int64)
    data = load_node_tensors(store, ids, y, predictor.input_specs, progress=False)
    cached = predictor.predict_proba_nodes(data.nodes)
    np.testing.assert_allclose(np.stack(probs), cached, atol=5e-3)
    emb = predictor.embed({s: store.read(ids[0], s) for s in predictor.streams})
    assert emb.dtype == np.float32 and emb.ndim == 1 and np.isfinite(emb).all()
    assert predictor.beta() == metrics["beta"]
    with pytest.raises(KeyError, match="motion"):
        predictor.predict_proba({"appearance": store.read(ids[0], "appearance")})


def test_evaluate_cli_reproduces_the_test_metrics(tp_run: Path, order_store: str) -> None:
    assert main(["evaluate", "--run", str(tp_run), "--store", order_store]) == 0
    ev = json.loads((tp_run / "evaluation-test.json").read_text())
    metrics = json.loads((tp_run / "metrics.json").read_text())
    assert ev["confusion_matrix"] == metrics["confusion_matrix"]
    assert ev["top1"] == metrics["top1"] and ev["n_test"] == 60


def test_evaluate_refuses_features_from_another_extractor(tp_run: Path, tmp_path: Path) -> None:
    other = FeatureStore.create(
        tmp_path / "other.zarr",
        extractor={"appearance": {"backbone": "other"}, "motion": {"backbone": "toy"}},
    )
    other.write_video("a", {"appearance": np.ones((4, 8)), "motion": np.ones((4, 10))}, label="x")
    with pytest.raises(ValueError) as err:
        evaluate_run(tp_run, tmp_path / "other.zarr", split="test")
    # only the differing field, not two whole config dicts
    assert str(err.value).endswith("backbone: toy (run) != other (store)"), str(err.value)
    assert "{" not in str(err.value)


def test_retrain_from_config_is_identical(order_store: str, tmp_path: Path) -> None:
    kw: dict[str, Any] = {"streams": ["appearance", "motion"], "epochs": 4, **FAST}
    kw["lr_grid"] = (1e-3, 1e-2)  # a small selection, which must be as reproducible
    kw["head_kwargs"] = {"segments": 4}  # level-3 nodes: read from the node cache
    first = train_run(order_store, tmp_path / "a", head="datp", seed=3, **kw)
    again = retrain(tmp_path / "a", tmp_path / "b")
    assert again["history"][-1]["train_loss"] == first["history"][-1]["train_loss"]
    assert again["confusion_matrix"] == first["confusion_matrix"]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "datp_weights.png").read_bytes()[:8] == PNG
    other = train_run(order_store, tmp_path / "c", head="datp", seed=4, make_plots=False, **kw)
    assert other["history"][-1]["train_loss"] != first["history"][-1]["train_loss"]


@pytest.fixture(scope="module")
def burst_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("burst") / "store.zarr"
    write_burst_store(path, n_train=12, n_test=10)
    return str(path)


@pytest.mark.parametrize(
    ("head", "head_kwargs", "lr"),
    [
        ("max", {}, 3e-3),
        ("tpp", {"levels": (1, 2)}, 3e-3),
        # unit-norm bilinear features (signed sqrt + L2) want a larger step for the classifier
        ("stcb", {"out_dim": 64}, 0.1),
        ("tp", {"depth": 2, "variant": "average", "pyramids": 2}, 3e-3),
    ],
)
def test_other_heads_learn_and_reload(
    burst_store: str, tmp_path: Path, head: str, head_kwargs: dict[str, Any], lr: float
) -> None:
    """Six classes told apart by a burst of content anywhere in the video: every head sees it,
    so each must beat chance (1/6) clearly (measured: max 0.73, tpp 0.88, stcb 0.75, tp 0.93)."""
    m = train_run(
        burst_store,
        tmp_path / head,
        head=head,
        streams=["appearance", "motion"],
        head_kwargs=head_kwargs,
        epochs=30,
        make_plots=False,
        lr=lr,
        weight_decay=1e-4,
        **FAST,
    )
    assert m["n_test"] == 60
    assert m["top1"] >= 0.5, m["top1"]  # chance 0.167, sd 0.048 at n = 60
    if head == "tpp":
        assert m["fusion_weights"] == {"appearance": 0.5, "motion": 0.5}  # DTPP: fixed
    if head == "tp":
        assert len(m["beta_pyramids"]["motion"]) == 2
    predictor = load_run(tmp_path / head)
    store = FeatureStore.open(burst_store)
    vids = store.videos(split="test")
    probs = [
        predictor.predict_proba({s: store.read(v, s) for s in ("appearance", "motion")})
        for v in vids
    ]
    assert all(p.shape == (6,) for p in probs)
    # the reloaded model, on frames, scores as the trained one did on the float16 node cache
    said = [predictor.class_names[int(np.argmax(p))] for p in probs]
    top1 = np.mean([a == b for a, b in zip(said, store.labels(vids), strict=True)])
    assert abs(top1 - m["top1"]) <= 2 / 60, (top1, m["top1"])


def test_frames_input_path_trains(order_store: str, tmp_path: Path) -> None:
    m = train_run(
        order_store,
        tmp_path / "frames",
        head="tp",
        streams=["motion"],
        head_kwargs={"depth": 2},
        inputs="frames",
        epochs=2,
        make_plots=False,
        **FAST,
        **ONE,
    )
    assert m["n_test"] == 60 and m["training"]["steps"] == 2 * 5  # 72 videos, batches of 16


def test_cli_usage_errors(order_store: str, tmp_path: Path) -> None:
    base = ["train", "--store", order_store, "--out", str(tmp_path / "x")]
    assert main([*base, "--head", "gap", "--levels", "3"]) == 2
    assert main([*base, "--head", "tp", "--stream", "depth"]) == 2
    assert main([*base, "--head", "tp", "--train-split", "nope"]) == 2
    assert main([*base, "--head", "svm", "--pyramids", "2"]) == 2


def test_svm_head_goes_to_the_svm_trainer(
    order_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def train_svm(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append((args, kwargs))
        return {"head": "svm", "top1": 0.5, "top5": 1.0, "mean_class_accuracy": 0.5}

    class SVMPredictor:
        @classmethod
        def load(cls, run_dir: Any) -> str:
            return f"svm at {run_dir}"

    import aggregator.svm.predictor
    import aggregator.svm.run
    from aggregator.svm.config import SVMConfig

    monkeypatch.setattr(aggregator.svm.run, "train_svm", train_svm)
    monkeypatch.setattr(aggregator.svm.predictor, "SVMPredictor", SVMPredictor)
    out = tmp_path / "svm"
    argv = ["train", "--store", order_store, "--head", "svm", "--out", str(out), "--levels", "3"]
    argv += ["--C", "2.5", "--kernel", "chi2", "--max-iter", "7"]
    argv += ["--eps", "1e-4", "--seed", "5", "--stream", "motion", "--no-index"]
    assert main(argv) == 0
    ((args, kwargs),) = calls
    assert kwargs == {}
    want = SVMConfig(
        streams=("motion",), levels=3, C=2.5, kernel="chi2", seed=5, max_iter=7, eps=1e-4
    )
    assert args == (order_store, str(out), want)
    assert want.to_dict()["standardize_inputs"] and want.test_split == "test"
    assert main([*argv, "--variant", "average"]) == 2  # chi2 is a per-node kernel: refused
    assert len(calls) == 1
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"head": "svm"}))
    assert load_run(out) == f"svm at {out}"  # type: ignore[comparison-overlap]


def test_summarize_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = []
    for i, (t1, t5, mca) in enumerate([(0.8, 0.9, 0.7), (0.6, 1.0, 0.5), (0.7, 0.95, 0.9)]):
        d = tmp_path / f"split{i + 1}"
        d.mkdir()
        payload = {"head": "tp", "n_test": 10, "top1": t1, "top5": t5, "mean_class_accuracy": mca}
        (d / "metrics.json").write_text(json.dumps(payload))
        dirs.append(str(d))
    summary = summarize_runs(dirs)
    assert math.isclose(summary["top1"]["mean"], 0.7)
    assert math.isclose(summary["top1"]["std"], 0.1)
    assert math.isclose(summary["mean_class_accuracy"]["std"], 0.2)
    assert summary["n_runs"] == 3
    assert main(["summarize", *dirs]) == 0
    assert "70.00 ± 10.00" in capsys.readouterr().out
    assert main(["summarize", str(tmp_path / "missing")]) == 2


def test_precision_is_resolved_and_recorded(order_store: str, tmp_path: Path) -> None:
    auto = resolve_precision("auto", torch.device("cpu"))
    assert auto == ("bf16" if bf16_supported(torch.device("cpu")) else "fp32")
    for precision, want in (("auto", auto), ("fp32", "fp32"), ("bf16", "bf16")):
        out = tmp_path / precision
        m = train_run(
            order_store,
            out,
            head="tp",
            streams=["motion"],
            head_kwargs={"depth": 2},
            epochs=1,
            precision=precision,
            make_plots=False,
            **FAST,
            **ONE,
        )
        config = json.loads((out / "config.json").read_text())
        assert m["precision"] == config["train_args"]["precision"] == want
        assert m["node_dtype"] == ("float16" if want == "bf16" else "float32")
