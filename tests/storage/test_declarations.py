"""Split lists and extractor configs written by many writers at once: none is lost, and two
conflicting extractor configs of one stream never both stick."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import FeatureStore
from storage.files import files_for

ROOT = Path(__file__).resolve().parents[2]

_WRITER = r"""
import sys, time
from pathlib import Path
from storage import FeatureStore

path, prefix, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():  # start together
    time.sleep(0.005)
store = FeatureStore.create(path, extractor={"shared": {"backbone": "toy"}})
for i in range(n):
    store.set_split_list(f"{prefix}-{i}", {"train": [f"{prefix}{i}"], "test": []})
    store.set_split_list("both", {"train": [prefix]})
    FeatureStore.create(path, extractor={f"{prefix}-{i}": {"backbone": prefix, "i": i}})
"""

_CONFLICT = r"""
import sys, time
from pathlib import Path
from storage import FeatureStore

path, backbone, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = FeatureStore.open(path, "r+")
while not go.exists():
    time.sleep(0.005)
try:
    FeatureStore.create(path, extractor={"appearance": {"backbone": backbone}})
except ValueError as exc:
    print(exc)
    sys.exit(3)
"""


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _release(go: Path, procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    time.sleep(1.0)  # both interpreters are up and waiting
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append((p.returncode, stdout + stderr))
    return out


def test_two_concurrent_writers_keep_every_split_list_and_stream(tmp_path: Path) -> None:
    path, go, n = tmp_path / "s.zarr", tmp_path / "go", 25
    FeatureStore.create(path)
    procs = [_start(_WRITER, str(path), prefix, str(n), str(go)) for prefix in ("a", "b")]
    for code, text in _release(go, procs):
        assert code == 0, text
    store = FeatureStore.open(path)
    lists = store.split_lists()
    assert {f"{p}-{i}" for p in "ab" for i in range(n)} | {"both"} == set(lists)
    assert lists["a-7"] == {"train": ["a7"], "test": []}
    assert lists["both"] in ({"train": ["a"]}, {"train": ["b"]})  # the later one
    ext = store.extractor
    assert set(ext) == {"shared"} | {f"{p}-{i}" for p in "ab" for i in range(n)}
    assert ext["b-3"] == {"backbone": "b", "i": 3} and ext["shared"] == {"backbone": "toy"}
    assert store.info()["split_lists"]["a-0"] == {"train": 1, "test": 0}


def test_conflicting_extractors_declared_at_once_never_both_win(tmp_path: Path) -> None:
    path, go = tmp_path / "s.zarr", tmp_path / "go"
    FeatureStore.create(path)
    procs = [_start(_CONFLICT, str(path), b, str(go)) for b in ("resnet50", "resnet101")]
    results = _release(go, procs)
    codes = [code for code, _ in results]
    # one wins, or both see each other and both fail; both succeeding would mix two extractors
    assert sorted(codes) in ([0, 3], [3, 3]), results
    for code, text in results:
        if code == 3:
            assert "appearance" in text and "differs" in text, text
    names = files_for(str(path)).list("index")
    declared = sum(n.startswith("extractor-") for n in names)
    if 0 in codes:
        winner = ("resnet50", "resnet101")[codes.index(0)]
        assert FeatureStore.open(path).extractor == {"appearance": {"backbone": winner}}
        assert declared == 1  # the loser withdrew its declaration
    else:
        assert FeatureStore.open(path).extractor == {}
        assert declared == 0


def test_a_rival_declaration_makes_a_writer_withdraw_whatever_the_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rival that appears between this writer's check and its write makes it withdraw even
    when this writer's file sorts first (the rival's writer may have listed before this file
    existed and taken the stream)."""
    from storage.declarations import EXTRACTOR, declare

    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    files = files_for(str(path))
    own = "extractor-00000000000000000001-000000000000.json"  # sorts before any real name

    def racing_declare(f: object, kind: str, payload: dict[str, object]) -> str:
        rival = declare(files, EXTRACTOR, {"appearance": {"backbone": "resnet50"}})
        assert own < rival
        files.write(f"index/{own}", json.dumps(payload).encode())
        return own

    monkeypatch.setattr("storage.declarations.declare", racing_declare)
    with pytest.raises(ValueError, match="same time"):
        store._merge_extractor({"appearance": {"backbone": "resnet101"}})
    assert own not in files.list("index")
    assert FeatureStore.open(path).extractor == {"appearance": {"backbone": "resnet50"}}


def test_split_lists_on_object_storage_from_many_threads() -> None:
    path = f"memory://framepool-{uuid.uuid4().hex}"
    FeatureStore.create(path, extractor={"appearance": {"backbone": "toy"}})

    def write(k: int) -> None:
        store = FeatureStore.open(path, "r+")
        for j in range(4):
            store.set_split_list(f"l{k}-{j}", {"train": [str(k)]})
        FeatureStore.create(path, extractor={f"s{k}": {"k": k}})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(8)))
    store = FeatureStore.open(path)
    assert set(store.split_lists()) == {f"l{k}-{j}" for k in range(8) for j in range(4)}
    assert set(store.extractor) == {"appearance"} | {f"s{k}" for k in range(8)}
    with pytest.raises(ValueError, match="differs"):
        FeatureStore.create(path, extractor={"s3": {"k": 4}})


def test_older_stores_attributes_still_count(tmp_path: Path) -> None:
    """A store whose split lists and extractor were written as attributes reads the same, and
    declarations add to them (a re-declared list replaces the attribute's)."""
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, extractor={"appearance": {"backbone": "old"}})
    store.write_video("v", {"appearance": np.ones((2, 2))}, label="x")
    root = zarr.open_group(str(path), mode="r+")
    root.require_group("splits").attrs.update(
        {"lists": {"old-1": {"train": ["v"]}, "old-2": {"test": ["v"]}}}
    )
    store = FeatureStore.open(path, "r+")
    assert store.videos(split="old-1/train") == ["v"]
    store.set_split_list("old-2", {"train": ["v"]})
    store.set_split_list("new", {"test": ["v"]})
    assert FeatureStore.open(path).split_lists() == {
        "old-1": {"train": ["v"]},
        "old-2": {"train": ["v"]},
        "new": {"test": ["v"]},
    }
    with pytest.raises(ValueError, match="differs"):
        FeatureStore.create(path, extractor={"appearance": {"backbone": "new"}})
    FeatureStore.create(path, extractor={"motion": {"backbone": "flow"}})
    assert FeatureStore.open(path).extractor == {
        "appearance": {"backbone": "old"},
        "motion": {"backbone": "flow"},
    }
