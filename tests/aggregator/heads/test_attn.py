"""The attentive probe beyond the shared head tests: masked attention, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.heads.attn import AttentiveProbe
from aggregator.run_loader import load_run
from api.cli import main
from storage import FeatureStore
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture
from tests.aggregator.toy_store import write_order_store


def test_attention_weights_are_a_distribution_over_segments() -> None:
    head = AttentiveProbe(in_features=5, num_classes=3, segments=6, queries=2, dim=8, heads=2)
    w = head.attention(torch.randn(4, 6, 5))
    assert w.shape == (4, 2, 2, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 2, 2))
    with pytest.raises(ValueError, match="multiple of heads=3"):
        AttentiveProbe(in_features=5, num_classes=3, dim=8, heads=3)


@pytest.fixture(scope="module")
def order_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("attn") / "store.zarr"
    write_order_store(path, n_train=12, n_test=10, streams=("appearance", "motion"))
    return str(path)


def test_attn_trains_evaluates_and_serves(order_store: str, tmp_path: Path) -> None:
    """Six classes that differ only in the order of three thirds (global means are equal): the
    probe's position embedding must tell them apart; then evaluate and the loaded run agree."""
    out = tmp_path / "attn"
    args = ["train", "--store", order_store, "--head", "attn", "--segments", "6"]
    args += ["--queries", "2", "--stream", "both", "--out", str(out), "--epochs", "30"]
    args += ["--batch-size", "16", "--threads", "1", "--device", "cpu", "--lr", "3e-3"]
    args += ["--weight-decay", "1e-4", "--no-plots"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"] == "attn" and metrics["n_test"] == 60
    assert metrics["top1"] >= 0.7, metrics["top1"]  # chance 0.167; the global-mean probe ~chance
    config = json.loads((out / "config.json").read_text())
    assert config["head_kwargs"]["segments"] == 6 and config["head_kwargs"]["queries"] == 2

    assert main(["evaluate", "--run", str(out), "--store", order_store]) == 0
    ev = json.loads((out / "evaluation-test.json").read_text())
    assert ev["confusion_matrix"] == metrics["confusion_matrix"]

    predictor = load_run(out)  # what `serve` loads
    store = FeatureStore.open(order_store)
    vids = store.videos(split="test")
    probs = np.stack(
        [
            predictor.predict_proba({s: store.read(v, s) for s in ("appearance", "motion")})
            for v in vids
        ]
    )
    said = [predictor.class_names[int(i)] for i in probs.argmax(1)]
    top1 = np.mean([a == b for a, b in zip(said, store.labels(vids), strict=True)])
    assert abs(top1 - metrics["top1"]) <= 2 / 60, (top1, metrics["top1"])
    emb = predictor.embed({s: store.read(vids[0], s) for s in ("appearance", "motion")})
    assert emb.shape == (2 * 2 * 256,) and np.isfinite(emb).all()
