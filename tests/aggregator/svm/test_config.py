"""SVMConfig: validated when made, the train_args it writes read back, and keyword options in
train_svm; an svm run served without the trainer's modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregator.svm.config import C_GRID, GAMMA_GRID, MAX_LEVELS, SVMConfig
from aggregator.train_config import BaseTrainConfig

ROOT = Path(__file__).resolve().parents[3]
SVM_RUNS = [ROOT / "tests" / "fixtures" / "runs-0.1" / name for name in ("svm-linear", "svm-rbf")]


def test_svm_config_shares_the_base_and_resolves_its_grids() -> None:
    config = SVMConfig(streams=("motion", "appearance", "motion"), kernel="rbf")
    assert isinstance(config, BaseTrainConfig) and config.head == "svm"
    assert config.streams == ("motion", "appearance")
    assert config.depths == list(range(1, MAX_LEVELS + 1))
    assert config.c_values == list(C_GRID) and config.gamma_values == list(GAMMA_GRID)
    fixed = config.replace(C=2.0, levels=3)
    assert fixed.depths == [3] and fixed.c_values == [2.0] and fixed.gamma_values == [1.0]
    assert not fixed.selecting and config.selecting
    assert SVMConfig(kernel="chi2").use_stats is False and SVMConfig().use_stats is True
    with pytest.raises(AttributeError):
        config.seed = 1  # type: ignore[misc]


def test_train_args_read_back_to_a_config_that_writes_the_same() -> None:
    config = SVMConfig(streams=["appearance"], levels=None, C=None, C_grid=[0.5, 2.0], seed=4)
    args = json.loads(json.dumps(config.to_dict()))
    assert "head" not in args and args["depths"] == list(range(1, MAX_LEVELS + 1))
    assert args["C_grid"] == [0.5, 2.0] and args["gamma_grid"] == [1.0]
    again = SVMConfig.from_dict(args)
    assert again.to_dict() == config.to_dict() and again.C_grid == (0.5, 2.0)
    with pytest.raises(ValueError, match="unknown training options \\['epochs'\\]"):
        SVMConfig.from_dict({**args, "epochs": 3})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"streams": ()}, "no stream given"),
        ({"levels": 0}, "levels must be an integer >= 1 or None, got 0"),
        ({"C_grid": ()}, "C_grid is empty"),
        ({"kernel": "rbf", "gamma_grid": (1.0, -2.0)}, "gamma_grid .* got \\[1.0, -2.0\\]"),
        ({"C": -1.0}, "'C' parameter .* Got -1.0"),
        ({"kernel": "poly"}, "'kernel' parameter .* Got 'poly'"),
        ({"head": "tp"}, "head is 'svm', got 'tp'"),
    ],
)
def test_svm_config_names_the_option_that_is_wrong(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SVMConfig(**options)


def test_train_svm_takes_a_config_and_keyword_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyword options replace the config's fields before anything is read."""
    from aggregator.svm import run as svm_run

    seen: list[SVMConfig] = []

    def stop(store: Any, config: SVMConfig) -> Any:
        seen.append(config)
        raise RuntimeError("stop")

    monkeypatch.setattr(svm_run, "_split_videos", stop)
    base = SVMConfig(streams=("appearance",), seed=1)
    for kwargs in ({"config": base, "seed": 7}, {"streams": ["appearance"], "seed": 7}):
        with pytest.raises(RuntimeError, match="stop"):
            svm_run.train_svm(object(), tmp_path, **kwargs)  # type: ignore[arg-type]
    assert [c.seed for c in seen] == [7, 7] and seen[0] == seen[1]
    with pytest.raises(ValueError, match="levels must be"):
        svm_run.train_svm(object(), tmp_path, base, levels=-1)  # type: ignore[arg-type]


@pytest.mark.parametrize("run", SVM_RUNS, ids=lambda p: p.name)
def test_an_svm_run_is_served_without_the_trainer(run: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from aggregator.svm.predictor import SVMPredictor\n"
        f"p = SVMPredictor.load({str(run)!r})\n"
        "x = {s: np.ones((5, p.in_features[s]), np.float32) for s in p.streams}\n"
        "assert abs(float(p.predict_proba(x).sum()) - 1) < 1e-6\n"
        "p.embed(x)\n"
        "heavy = ('aggregator.svm.run', 'aggregator.svm.estimator', 'aggregator.svm.solvers',\n"
        "         'aggregator.svm.selection', 'aggregator.train', 'cvxpy')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
