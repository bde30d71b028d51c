"""How the command line fails: one clear line and the right exit status for known failures, a
traceback for bugs, and silence when the reader of its output stops reading."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from api.cli import main
from storage import FeatureStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "s.zarr"
    fs = FeatureStore.create(path)
    rng = np.random.default_rng(0)
    for i in range(6):
        feats = rng.standard_normal((12, 16)).astype(np.float32)
        fs.write_video(f"v{i}", streams={"appearance": feats}, label="ab"[i % 2],
                       split="test" if i >= 4 else "train")  # fmt: skip
    return path


def _damage(store: Path, video_id: str) -> None:
    chunk = next(p for p in (store / "videos" / video_id / "appearance").rglob("*")
                 if p.is_file() and p.name != "zarr.json")  # fmt: skip
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 3])


def _train(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--store", str(store), "--head", "gap", "--out", str(out), "--epochs", "1",
            "--device", "cpu", "--no-plots", *extra]  # fmt: skip


def test_a_damaged_chunk_is_one_line_and_exit_1(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _damage(store, "v1")
    assert main(_train(store, tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("framepool train: error: video 'v1'") and "is damaged" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    # -v adds the traceback
    assert main(["-v", *_train(store, tmp_path / "run2")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "is damaged" in err


def test_a_missing_store_and_a_bad_option_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["store", "info", str(tmp_path / "nowhere.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere.zarr" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as info:
        main(["train", "--store", str(tmp_path), "--head", "gap", "--epochs", "many"])
    assert info.value.code == 2


def test_a_bug_shows_its_traceback_and_is_not_a_usage_error(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        return Fraction("not a number")  # a ValueError raised inside a library

    monkeypatch.setattr("storage.FeatureStore.info", broken)
    assert main(["store", "info", str(store)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "fractions.py" in err
    assert "internal error: ValueError" in err and "usage" not in err

    def typo(*args: object, **kwargs: object) -> object:
        return {}["appearance"]  # a KeyError in code that is not framepool's

    monkeypatch.setattr("storage.FeatureStore.info", typo)
    assert main(["store", "info", str(store)]) == 1
    assert "internal error: KeyError" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(store: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "store", "info", str(store), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -n 0`: nobody reads what it prints
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141
    assert err == ""
