"""Loading and serving a run imports no trainer.

A fresh interpreter loads a run of every head as the service does
(:func:`api.service.served_runs.load_one`), predicts one video with it, and reports which
trainer modules were imported by then: none may be. The runs of ``tests/fixtures/runs-0.1``
cover most heads; ``attn`` and ``stpn`` are trained here, small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregator.maps.synthetic import LocationTask, write_location_store
from tests.aggregator.toy_store import write_order_store

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "runs-0.1"
OLD_RUNS = {
    "gap": "gap-appearance",
    "max": "max-both",
    "tp": "tp-both",
    "tpp": "tpp-both",
    "datp": "datp-appearance",
    "stcb": "stcb-both",
    "svm": "svm-linear",
}
TRAINERS = (
    "aggregator.train",
    "aggregator.train_loop",
    "aggregator.trainer",
    "aggregator.trainers",
    "aggregator.selection",
    "aggregator.run_data",
    "aggregator.probe_start",
    "aggregator.maps.train",
    "aggregator.svm.run",
    "aggregator.finetune",
)

# run in a fresh interpreter: load and serve every run, then list the trainers imported so far
SERVE = """
import json, sys
from pathlib import Path

import numpy as np

from api.service.served_runs import load_one
from storage import FeatureStore

trainers = tuple(sys.argv[2].split(","))
seen = {}
for name, run in json.loads(sys.argv[1]).items():
    loaded = load_one(Path(run["dir"]), None)
    predictor = loaded.predictor
    if run["store"] is None:
        with np.load(run["features"]) as data:
            video = sorted({k.split("/")[0] for k in data.files})[0]
            features = {s: data[f"{video}/{s}"] for s in predictor.streams}
    else:
        store = FeatureStore.open(run["store"])
        video = store.videos()[0]
        features = {s: store.read(video, s) for s in predictor.streams}
    proba = predictor.predict_proba(features)
    assert proba.shape == (len(predictor.class_names),), proba.shape
    seen[name] = sorted(
        m for m in sys.modules if any(m == t or m.startswith(t + ".") for t in trainers)
    )
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Per head, the trainer modules imported once its run was loaded and had predicted."""
    from aggregator.trainers import train

    root = tmp_path_factory.mktemp("serving")
    order = root / "order.zarr"
    write_order_store(order, n_train=8, n_test=4, streams=("appearance",))
    loc = root / "loc.zarr"
    task = LocationTask(grid=3, channels=4, frames=(1, 4), map_stride=2)
    write_location_store(loc, train_per_class=3, test_per_class=1, task=task)
    fast: dict[str, Any] = {"epochs": 1, "batch_size": 8, "device": "cpu", "make_plots": False}
    train(order, root / "attn", head="attn", probe=False, **fast)
    train(loc, root / "stpn", head="stpn", head_kwargs={"out_dim": 32}, **fast)
    # the synthetic store records no extractor; a service also reads the configs of the
    # backbones that compute the maps
    config = json.loads((root / "stpn" / "config.json").read_text())
    config["extractor"].update({s: {"backbone": "toy"} for s in ("appearance", "motion")})
    (root / "stpn" / "config.json").write_text(json.dumps(config))

    features = str(FIXTURES / "features.npz")
    runs: dict[str, dict[str, Any]] = {
        head: {"dir": str(FIXTURES / name), "store": None, "features": features}
        for head, name in OLD_RUNS.items()
        if head != "svm"
    }
    runs["attn"] = {"dir": str(root / "attn"), "store": str(order)}
    runs["stpn"] = {"dir": str(root / "stpn"), "store": str(loc)}
    # last: the runs before it are checked without it
    runs["svm"] = {"dir": str(FIXTURES / OLD_RUNS["svm"]), "store": None, "features": features}
    out = subprocess.run(
        [sys.executable, "-c", SERVE, json.dumps(runs), ",".join(TRAINERS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    return seen


@pytest.mark.parametrize("head", ["gap", "max", "tp", "tpp", "datp", "stcb", "attn", "stpn"])
def test_serving_a_torch_run_imports_no_trainer(imported: dict[str, list[str]], head: str) -> None:
    assert imported[head] == [], f"serving a {head} run imported {imported[head]}"


def test_serving_an_svm_run_imports_no_trainer(imported: dict[str, list[str]]) -> None:
    assert imported["svm"] == [], f"serving an svm run imported {imported['svm']}"
