"""Run directories written before probability fusion still load, and score as they were trained.

Those runs fused two streams' learned weights on logits (``sum_s w_s z_s``) and their
``config.json`` records neither ``fusion_rule`` nor ``standardize``. They are made here by hand,
in that format, and loaded by ``evaluate`` and the service's loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.evaluate import evaluate_run
from aggregator.heads import GlobalPool, TwoStream
from aggregator.run_loader import TorchRun, load_run
from aggregator.rundir import learned_fusion_rule
from api.service.served_runs import load_one
from storage import FeatureStore
from tests.aggregator.toy_store import write_order_store

STREAMS = ("appearance", "motion")


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, TwoStream]:
    root = tmp_path_factory.mktemp("old_run")
    store = write_order_store(root / "store.zarr", n_train=2, n_test=3, d=4, streams=STREAMS)
    dims = {s: int(store.read("c0_v000", s).shape[1]) for s in STREAMS}
    torch.manual_seed(0)
    model = TwoStream(
        heads={s: GlobalPool(in_features=d, num_classes=6, kind="mean") for s, d in dims.items()},
        fusion="learned",
        weights={"appearance": 0.8, "motion": 0.2},
    )
    for p in model.parameters():  # weights far from the initial ones, classifiers of unlike scale
        p.data.normal_(0.0, 1.0)
    with torch.no_grad():
        model.stream_head("motion").fc.weight.mul_(20.0)
    model.eval()
    run = root / "run"
    run.mkdir()
    config = {  # config.json as `framepool train` wrote it before probability fusion
        "format": "framepool-run/1",
        "head": "gap",
        "head_kwargs": {},
        "in_features": dims,
        "num_classes": 6,
        "fusion": "learned",
        "fusion_weights": None,
        "streams": list(STREAMS),
        "input_specs": {s: model.stream_head(s).input_spec.to_dict() for s in STREAMS},
        "store": str(root / "store.zarr"),
        "extractor": {s: store.extractor.get(s) for s in STREAMS},
        "class_names": store.class_names,
        "splits": {"train": "train", "test": "test", "val_fraction": 0.1, "validation_ids": []},
        "seed": 0,
        "train_args": {"head": "gap", "epochs": 30, "batch_size": 128, "lr": 0.001},
        "run_id": "run-0000",
    }
    (run / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), run / "model.pt")
    return run, str(root / "store.zarr"), model


def logit_fusion(model: TwoStream, nodes: dict[str, torch.Tensor]) -> torch.Tensor:
    z = model.stream_logits(nodes)
    w = model.weights_tensor()
    return sum((w[i] * z[s] for i, s in enumerate(model.streams)), torch.zeros(()))


def test_an_old_run_scores_with_logit_fusion_in_evaluate_and_the_service(
    old_run: tuple[Path, str, TwoStream],
) -> None:
    run, store_path, model = old_run
    assert learned_fusion_rule(json.loads((run / "config.json").read_text())) == "logits"
    loaded = load_run(run)
    assert isinstance(loaded, TorchRun) and isinstance(loaded.model, TwoStream)
    assert loaded.model.learned_on == "logits" and loaded.model.standardizer is None
    store_videos = [f"c{c}_v{i:03d}" for c in range(6) for i in (2, 3, 4)]
    store = FeatureStore.open(store_path, "r")
    expected, got = [], []
    for vid in store_videos:
        feats = {s: store.read(vid, s).astype(np.float32) for s in STREAMS}
        nodes = {s: torch.from_numpy(v.mean(0, keepdims=True))[None] for s, v in feats.items()}
        with torch.no_grad():
            expected.append(logit_fusion(model, nodes))
            got.append(loaded.model.forward_nodes(nodes))
            probability = model.forward_nodes(nodes)  # today's rule: another answer
        assert not torch.allclose(torch.softmax(probability, 1), torch.softmax(expected[-1], 1))
    assert torch.allclose(torch.cat(got), torch.cat(expected), atol=1e-5)
    metrics = evaluate_run(run, store_path, write=False)
    labels = np.array(
        [store.class_names.index(store.video_attrs(v)["label"]) for v in store_videos]
    )
    top1 = float((torch.cat(expected).argmax(1).numpy() == labels).mean())
    assert metrics["top1"] == pytest.approx(top1)
    service = load_one(run, None)
    assert isinstance(service.predictor, TorchRun)
    assert service.predictor.model.learned_on == "logits"


def test_new_runs_record_their_fusion_rule() -> None:
    assert learned_fusion_rule({"fusion_rule": "probabilities"}) == "probabilities"
    assert learned_fusion_rule({"standardize": False}) == "probabilities"
    assert learned_fusion_rule({}) == "logits"
    with pytest.raises(ValueError, match="fusion_rule must be"):
        learned_fusion_rule({"fusion_rule": "votes"})
