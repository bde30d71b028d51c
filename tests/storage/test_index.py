"""The metadata index: it agrees with the per-video groups after every kind of write, a crash
at any step, and concurrent writers; it is rebuilt when missing or stale; listing reads only it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import storage.index as index_mod
from storage import FeatureStore
from storage.files import files_for
from storage.layout import record_from_group

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("status", "label", "split", "group", "error", "extracted_at", "source_sha256", "n_frames")


@pytest.fixture(params=["local", "memory"])
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "features.zarr")
    return f"memory://framepool-{uuid.uuid4().hex}"


def group_truth(path: str) -> dict[str, dict[str, Any]]:
    """Every video as its group says, read straight from the zarr.json files."""
    files = files_for(path)
    out = {}
    for vid in files.list("videos"):
        if vid == "zarr.json":
            continue
        rec = record_from_group(files, vid)
        if rec["op"] == "put":
            out[vid] = {**{k: rec.get(k) for k in FIELDS}, "shapes": rec["shapes"]}
    return out


def index_view(path: str) -> dict[str, dict[str, Any]]:
    table = FeatureStore.open(path, "r").index_table(status=None)
    out = {}
    for i in range(len(table)):
        rec = table.record(i)
        out[rec["id"]] = {**{k: rec.get(k) for k in FIELDS}, "shapes": rec["shapes"]}
    return out


def assert_agrees(path: str) -> None:
    assert index_view(path) == group_truth(path)


def test_index_agrees_after_every_kind_of_write(store_path: str) -> None:
    rng = np.random.default_rng(0)
    store = FeatureStore.create(store_path)
    a = rng.standard_normal((9, 6)).astype(np.float32)
    store.write_video("v1", {"appearance": a, "motion": a[:, :3]}, label="x", split="train")
    store.write_video("v2", {"appearance": a[:2]}, label="y", split="test", meta={"n_frames": 2})
    store.write_video("v4", {"appearance": a[:3]}, label="x", split="train", group="subject7")
    assert_agrees(store_path)
    assert store.groups(["v1", "v4"]) == [None, "subject7"]
    store.delete_video("v4")
    store.write_video("v1", {"appearance": a[:4]}, label="x", split="train")  # overwrite
    assert_agrees(store_path)
    store.mark_failed("v3", "v3.mp4: no video stream", label="y")
    assert_agrees(store_path)
    store.update_video_attrs("v2", split="train", label="z", group="g03")
    assert_agrees(store_path)
    assert store.groups(["v2"]) == ["g03"]
    store.mark_damaged("v2", "chunk c/0/0 missing")
    assert_agrees(store_path)
    store.delete_video("v3")
    assert_agrees(store_path)
    ro = FeatureStore.open(store_path, "r")
    assert ro.videos() == ["v1"]
    assert ro.videos(status="incomplete") == ["v2"]
    assert ro.status("v2") == "incomplete" and ro.status("v3") is None
    assert ro.streams("v1") == ["appearance"] and ro.n_frames("v1", "appearance") == 4
    assert ro.labels(["v1", "v2"]) == ["x", "z"]
    assert ro.groups(["v1", "v2"]) == [None, "g03"]
    # the writer's own view matches a fresh reader's
    assert store.videos(status=None) == ro.videos(status=None) == ["v1", "v2"]
    assert store.info() == ro.info()


def test_listing_reads_only_the_index(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    for i in range(5):
        store.write_video(
            f"v{i}", {"appearance": np.ones((3, 4))}, label=f"c{i % 2}", split="train"
        )
    expected = FeatureStore.open(path).info()
    # make every per-video group unreadable: a listing that touched one would fail or change
    for i in range(5):
        (path / "videos" / f"v{i}" / "zarr.json").write_text("{not json")
    ro = FeatureStore.open(path, "r")
    assert ro.videos(split="train") == [f"v{i}" for i in range(5)]
    assert ro.info() == expected
    assert ro.labels(["v0", "v1"]) == ["c0", "c1"]
    assert ro.class_names == ["c0", "c1"]


def test_missing_or_stale_index_is_rebuilt(store_path: str) -> None:
    store = FeatureStore.create(store_path)
    store.write_video("a", {"appearance": np.ones((3, 4))}, label="x", split="train")
    store.write_video("b", {"appearance": np.ones((2, 4))}, label="y", split="test")
    store.mark_failed("c", "broken", label="y", group="s1")
    files = files_for(store_path)
    for name in files.list("index"):
        if name != "zarr.json":
            files.remove(f"index/{name}")
    # a group written by plain zarr, which the index has never heard of
    root = zarr.open_group(store_path, mode="r+")
    grp = root["videos"].create_group(
        "plain", attributes={"status": "complete", "label": "x", "streams": ["appearance"]}
    )
    grp.create_array(name="appearance", shape=(5, 4), dtype="float16", chunks=(5, 4))[...] = 2
    ro = FeatureStore.open(store_path, "r")
    assert ro.videos() == ["a", "b", "plain"]
    assert ro.videos(status="failed") == ["c"]
    assert ro.groups(["a", "c"]) == [None, "s1"]  # rebuilt from the groups' attrs
    assert ro.read("plain", "appearance").tolist() == np.full((5, 4), 2.0).tolist()
    assert_agrees(store_path)
    # a writer persists what it had to read from groups; reindex replaces every part
    rw = FeatureStore.open(store_path, "r+")
    assert rw.videos() == ["a", "b", "plain"]
    counts = rw.reindex()
    assert counts == {"videos": 4, "complete": 3, "failed": 1, "incomplete": 0}
    names = [n for n in files.list("index") if n != "zarr.json"]
    assert len(names) == 1 and names[0].startswith("base-")
    assert_agrees(store_path)


def test_group_removed_by_hand_leaves_the_view(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    store.write_video("a", {"appearance": np.ones((3, 4))})
    store.write_video("b", {"appearance": np.ones((3, 4))})
    shutil.rmtree(path / "videos" / "b")
    assert FeatureStore.open(path).videos() == ["a"]


def test_parts_freeze_and_compact(store_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "ROLL", 4)
    monkeypatch.setattr(index_mod, "MAX_FROZEN", 2)
    store = FeatureStore.create(store_path)
    for i in range(23):
        store.write_video(f"v{i:02d}", {"appearance": np.full((2, 3), i)}, label=str(i % 3))
    store.delete_video("v05")
    names = files_for(store_path).list("index")
    assert any(n.startswith("base-") for n in names)  # compaction ran
    assert sum(n.endswith(".npz") for n in names) <= 3
    ro = FeatureStore.open(store_path, "r")
    assert ro.videos() == [f"v{i:02d}" for i in range(23) if i != 5]
    assert ro.read("v22", "appearance")[0, 0] == 22
    assert_agrees(store_path)
    assert store.compact_index() >= 0
    assert_agrees(store_path)
    store.write_video("v99", {"appearance": np.full((2, 3), 99)}, label="0")
    store.close()  # the live part frozen, then every frozen part merged: readers load one file
    names = files_for(store_path).list("index")
    assert next(n for n in names if n.endswith((".npz", ".jsonl"))).startswith("base-")
    assert sum(n.endswith((".npz", ".jsonl")) for n in names) == 1
    assert_agrees(store_path)


def test_a_part_compacted_while_the_index_is_read(
    store_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_mod, "ROLL", 4)
    monkeypatch.setattr(index_mod, "MAX_FROZEN", 100)  # no compaction but the one below
    store = FeatureStore.create(store_path)
    for i in range(10):
        store.write_video(f"v{i}", {"appearance": np.full((2, 3), i)}, label="x")
    files = files_for(store_path)
    real_read = files.read
    reads: list[str] = []

    def read(key: str) -> bytes | None:  # another writer compacts between listing and reading
        reads.append(key)
        if len(reads) == 2:
            assert index_mod.compact(files) > 0
        return real_read(key)

    monkeypatch.setattr(files, "read", read)
    found = index_mod.read_index(files)
    assert found is not None
    table, _ = found
    assert table.ids[table.op == index_mod.PUT].tolist() == [f"v{i}" for i in range(10)]
    assert any("base-" in k for k in reads)  # the base that replaced the parts was read


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    store.write_video("a", {"appearance": np.ones((3, 4))}, label="x")
    part = next((path / "index").glob("*.jsonl"))
    with open(part, "a") as f:
        f.write('{"id": "b", "op": "put", "status": "comp')  # killed mid-line
    assert FeatureStore.open(path).videos(status=None) == ["a"]


# ---------------------------------------------------------------------------------- crashes
_CRASH = """
import os, signal, sys
import numpy as np
import storage.files
from storage import FeatureStore

path, op, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = FeatureStore.create(path)
store.write_video("done", {"appearance": np.ones((4, 8))}, label="a", split="train")
store.mark_failed("gone", "broken", label="a")
writes = [0]

def tick(what):
    writes[0] += 1
    if writes[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

for method in ("write", "put", "append", "remove_tree"):
    def counted(self, key, *args, _original=getattr(storage.files.LocalFiles, method)):
        tick(key)
        return _original(self, key, *args)
    setattr(storage.files.LocalFiles, method, counted)

rng = np.random.default_rng(1)
if op == "write":
    store.write_video("v", {"appearance": rng.standard_normal((40, 20000)), "motion":
                      rng.standard_normal((40, 16))}, label="b", split="test")
elif op == "rewrite":
    store.write_video("done", {"appearance": np.zeros((3, 8))}, label="c", split="test")
elif op == "fail":
    store.mark_failed("done", "now broken", label="a")
elif op == "delete":
    store.delete_video("gone")
print("writes", writes[0])
"""


def _crash(path: Path, op: str, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CRASH, str(path), op, str(kill_at)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("op", "every"),
    [
        ("write", False),  # a few points: after the pending record, mid arrays, the last two
        pytest.param("write", True, marks=pytest.mark.slow),
        pytest.param("rewrite", True, marks=pytest.mark.slow),
        pytest.param("fail", True, marks=pytest.mark.slow),
        pytest.param("delete", True, marks=pytest.mark.slow),
    ],
)
def test_sigkill_at_every_write_keeps_index_and_groups_consistent(
    tmp_path: Path, op: str, every: bool
) -> None:
    # count the writes the operation makes, then die before each of them in turn
    full = _crash(tmp_path / "count.zarr", op, 0)
    assert full.returncode == 0, full.stderr
    n_writes = int(full.stdout.split()[-1])
    assert n_writes >= 2
    points = range(1, n_writes + 1) if every else (2, 4, n_writes - 1, n_writes)
    for kill_at in points:
        path = tmp_path / f"k{kill_at}.zarr"
        proc = _crash(path, op, kill_at)
        assert proc.returncode == -9, proc.stderr
        assert_agrees(str(path))
        store = FeatureStore.open(path, "r")
        for vid in store.videos():  # whatever is complete is whole and readable
            attrs = store.video_attrs(vid)
            assert attrs["extracted_at"] and attrs["error"] is None
            for s in store.streams(vid):
                assert np.isfinite(store.read(vid, s)).all()
        if op == "write":  # absent or incomplete until the group's last write, then whole
            if kill_at < n_writes:
                assert store.status("v") in (None, "incomplete")
            elif store.status("v") == "complete":
                assert store.read("v", "appearance").shape == (40, 20000)
        if op == "rewrite":  # the old version or an incomplete one, never a mix
            assert store.status("done") in ("complete", "incomplete", None)
            if store.status("done") == "complete":
                assert store.read("done", "appearance").shape in ((4, 8), (3, 8))
                label = store.labels(["done"])[0]
                n = store.n_frames("done", "appearance")
                assert (label, n) in (("a", 4), ("c", 3))


# ---------------------------------------------------------------------------------- writers
_WRITER = """
import os, sys, time
import numpy as np
import storage.index
from storage import FeatureStore
storage.index.ROLL = 16
storage.index.MAX_FROZEN = 3
storage.index.MAX_CLASS_FILES = 2
path, prefix, n, writers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
deadline = time.monotonic() + 120

def wait_for(*names):
    while not all(os.path.exists(f"{path}.ready-{p}") for p in names):
        assert time.monotonic() < deadline, "another writer never started"
        time.sleep(0.002)

open(f"{path}.ready-{prefix}", "w").close()
wait_for(*writers)  # every writer creates the (new) store at once, then writes at once
store = FeatureStore.create(path, class_names=[prefix, f"{prefix}-declared"])
for i in range(n):
    store.write_video(f"{prefix}{i:03d}", {"appearance": np.full((3, 4), i)},
                      label=f"{prefix}-label{i % 7}", split="train" if i % 2 else "test")
    if i % 10 == 0:
        store.mark_failed(f"{prefix}f{i:03d}", "broken", label=prefix)
    if i % 4 == 0:
        store.add_class_names([f"{prefix}-extra{i}"])
"""


def _expected_names(prefix: str, n: int) -> set[str]:
    return (
        {prefix, f"{prefix}-declared"}
        | {f"{prefix}-label{i % 7}" for i in range(n)}
        | {f"{prefix}-extra{i}" for i in range(0, n, 4)}
    )


def _run_writers(path: Path, prefixes: tuple[str, ...], n: int) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), prefix, str(n), ",".join(prefixes)],
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in prefixes
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def test_two_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"  # not created yet: both writers create it at once
    _run_writers(path, ("a", "b"), 120)
    store = FeatureStore.open(path)
    assert len(store.videos()) == 240
    assert len(store.videos(status="failed")) == 24
    assert store.videos(split="train")[:2] == ["a001", "a003"]
    assert store.class_names == sorted(_expected_names("a", 120) | _expected_names("b", 120))
    assert store.read("b119", "appearance")[0, 0] == 119
    assert_agrees(str(path))
    parts = json.dumps(sorted(files_for(str(path)).list("index")))
    assert "base-" in parts  # both writers froze and compacted parts while the other wrote


def test_concurrent_creates_never_lose_a_class_name(tmp_path: Path) -> None:
    """Four processes create one new store at once and declare names while writing: the
    class-name files are merged while others declare, and every name survives."""
    path = tmp_path / "s.zarr"
    prefixes = ("p", "q", "r", "s")
    _run_writers(path, prefixes, 24)
    store = FeatureStore.open(path)
    want = set().union(*(_expected_names(p, 24) for p in prefixes))
    assert store.class_names == sorted(want)
    assert len(store.videos()) == 4 * 24
    assert_agrees(str(path))


def test_class_names_merge_on_object_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads declaring names on one fsspec store (no locks there): none is lost, and the
    declarations are merged into few files."""
    monkeypatch.setattr(index_mod, "MAX_CLASS_FILES", 3)
    path = f"memory://framepool-{uuid.uuid4().hex}"
    FeatureStore.create(path)

    def declare(k: int) -> None:
        store = FeatureStore.create(path, class_names=[f"c{k}"])
        for j in range(5):
            store.add_class_names([f"c{k}-{j}"])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(declare, range(8)))
    store = FeatureStore.open(path)
    assert store.class_names == sorted(
        [f"c{k}" for k in range(8)] + [f"c{k}-{j}" for k in range(8) for j in range(5)]
    )
    files = [n for n in files_for(path).list("index") if n.startswith("classes-")]
    assert 1 <= len(files) < 48  # 48 declarations, merged as they came


def test_labels_and_declared_names_are_the_class_names(store_path: str) -> None:
    store = FeatureStore.create(store_path, class_names=["empty"])
    store.write_video("v0", {"appearance": np.ones((2, 3))}, label="walk")
    store.mark_failed("v1", "broken", label="fall")
    store.write_video("v2", {"appearance": np.ones((2, 3))})  # no label: no class
    assert FeatureStore.open(store_path).class_names == ["empty", "fall", "walk"]
    store.add_class_names(["empty", "zzz"])
    assert FeatureStore.open(store_path).class_names == ["empty", "fall", "walk", "zzz"]
    store.delete_video("v1")
    assert FeatureStore.open(store_path).class_names == ["empty", "walk", "zzz"]


def test_close_freezes_the_live_part(store_path: str) -> None:
    store = FeatureStore.create(store_path)
    for i in range(5):
        store.write_video(f"v{i}", {"appearance": np.ones((2, 3))}, label="x")
    names = files_for(store_path).list("index")
    assert any(n.endswith(".jsonl") for n in names)
    store.close()
    names = files_for(store_path).list("index")
    assert not any(n.endswith(".jsonl") for n in names)
    assert FeatureStore.open(store_path).videos() == [f"v{i}" for i in range(5)]
    store.write_video("v5", {"appearance": np.ones((2, 3))}, label="x")  # still usable
    assert_agrees(store_path)


def test_create_rewrites_root_attrs_a_concurrent_creator_erased(tmp_path: Path) -> None:
    """Two creators race on the root document: the second one's empty document can replace the
    first one's attrs after the first made its members. Only the store's own members there, so
    create writes the attrs again; a group with other content is still refused."""
    path = tmp_path / "s.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_group("videos")
    root.create_group("index")
    store = FeatureStore.create(path, class_names=["a"])
    assert store.attrs["schema_version"] is not None
    assert FeatureStore.open(path).class_names == ["a"]

    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_group("images")
    with pytest.raises(ValueError, match="not a framepool store"):
        FeatureStore.create(other)


def test_index_parts_from_before_groups_read_as_no_group(tmp_path: Path) -> None:
    """A base part written before the ``group`` column existed (no such column at all) beside
    a newer part that has one: the old videos read as having no group."""
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path)
    store.write_video("old", {"appearance": np.ones((3, 4))}, label="x", split="train")
    store.reindex()
    files = files_for(str(path))
    (base,) = [n for n in files.list("index") if n.startswith("base-")]
    table = index_mod.IndexTable.from_npz(files.read(f"index/{base}") or b"")
    del table.text["group"]
    files.write(f"index/{base}", table.to_npz())
    assert "group" not in index_mod.IndexTable.from_npz(files.read(f"index/{base}") or b"").text
    ro = FeatureStore.open(path, "r")
    assert ro.groups(["old"]) == [None]
    rw = FeatureStore.open(path, "r+")
    rw.write_video("new", {"appearance": np.ones((2, 4))}, label="y", split="train", group="g1")
    assert FeatureStore.open(path, "r").groups(["old", "new"]) == [None, "g1"]


def test_a_damaged_index_document_is_named_in_the_error(tmp_path: Path) -> None:
    """Class-name files and declarations are read by one reader: a file that is not JSON, or
    JSON of the wrong kind, is an error naming that file."""
    path = tmp_path / "s.zarr"
    store = FeatureStore.create(path, class_names=["a"])
    store.write_video("v", {"appearance": np.ones((2, 3))}, label="a", split="train")
    index = path / "index"
    (index / "classes-99999999999999999999-bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"class-name file index/classes-9+-bad\.json .*JSON"):
        _ = FeatureStore.open(path, "r").class_names
    (index / "classes-99999999999999999999-bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="holds dict, not a list of names"):
        _ = FeatureStore.open(path, "r").class_names
    (index / "classes-99999999999999999999-bad.json").unlink()
    (index / "splits-99999999999999999999-bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"file index/splits-9+-bad\.json .* holds list"):
        FeatureStore.open(path, "r").split_lists()
