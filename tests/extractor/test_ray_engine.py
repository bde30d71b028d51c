"""``extract --engine ray`` on a real (local) Ray cluster: the same features (and spatial maps) as
the local engine, every video complete exactly once through a killed model actor, a lost node
and a killed driver, bad files recorded failed, videos and store on an S3 API server.

The cluster is the session's (``ray_cluster``: one head node of 2 CPUs); runs keep few frames of
each real clip (``max_frames``) with a random ResNet-18.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.cli import main
from extractor.pipeline import ExtractionSummary, run_extract
from extractor.ray_engine import RayOptions
from extractor.sources import make_sources
from extractor.spec import BackboneSpec
from storage import FeatureStore
from storage.index import INDEX_DIR, IndexTable
from tests.extractor.conftest import S3Server
from tests.extractor.test_pipeline import BAD_PROBLEMS

pytestmark = pytest.mark.timeout(600)

SPEC = BackboneSpec(weights="random", arch="resnet18")
FRAMES = 4  # kept frames per clip


def extract(
    inputs: Sequence[str | Path],
    store: str | Path,
    *,
    engine: str = "ray",
    progress: bool = False,
    **ray: Any,
) -> ExtractionSummary:
    return run_extract(
        inputs,
        store,
        SPEC,
        maps=("appearance_map",),  # the spatial maps too, reduced and every 2nd frame's
        map_dim=8,
        map_stride=2,
        device="cpu",
        max_frames=FRAMES,
        progress=progress,
        progress_interval=0,  # a line at every finished video (stderr is not a terminal here)
        engine=engine,
        ray=RayOptions(**ray) if engine == "ray" else None,
    )


def complete_records(store: str | Path) -> Counter[str]:
    """How many ``complete`` records each video has across every part of the store's index
    (every writer's own file): one per video when nothing was written twice."""
    from storage.files import files_for

    files = files_for(str(store))
    counts: Counter[str] = Counter()
    for name in files.list(INDEX_DIR):
        data = files.read(f"{INDEX_DIR}/{name}")
        if data is None:
            continue
        if name.endswith(".jsonl"):
            for line in data.decode().splitlines():
                rec = json.loads(line) if line.strip() else {}
                if rec.get("op") == "put" and rec.get("status") == "complete":
                    counts[rec["id"]] += 1
        elif name.endswith(".npz"):
            table = IndexTable.from_npz(data)
            done = (table.op == 0) & (table.text["status"] == "complete")
            counts.update(table.ids[done].tolist())
    return counts


def assert_complete_once(store: str | Path, ids: Sequence[str]) -> None:
    fs = FeatureStore.open(store)
    assert fs.videos() == sorted(ids)
    assert fs.info()["status"]["complete"] == len(ids)
    for vid in ids:
        assert fs.video_attrs(vid)["status"] == "complete"
    counts = complete_records(store)
    assert {v: counts[v] for v in ids} == dict.fromkeys(ids, 1)


@pytest.fixture(scope="module")
def local_reference(
    tmp_path_factory: pytest.TempPathFactory, real_videos: list[Path]
) -> FeatureStore:
    """Every real clip extracted by the local engine: what the Ray engine must reproduce."""
    store = tmp_path_factory.mktemp("local") / "features.zarr"
    summary = extract(real_videos, store, engine="local")
    assert summary.ok and len(summary.complete) == len(real_videos)
    return FeatureStore.open(store)


def assert_same_features(store: str | Path, reference: FeatureStore, ids: Sequence[str]) -> None:
    fs = FeatureStore.open(store)
    assert fs.extractor == reference.extractor
    for vid in ids:
        assert fs.video_attrs(vid)["frame_indices"] == reference.video_attrs(vid)["frame_indices"]
        for stream in ("appearance", "motion"):
            got, want = fs.read(vid, stream), reference.read(vid, stream)
            assert got.shape == want.shape == (FRAMES, 512), (vid, stream)
            # one model, one CPU: batches of other videos around a frame may only move the
            # last float16 bit
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3, err_msg=f"{vid} {stream}")
        got_map, want_map = fs.read(vid, "appearance_map"), reference.read(vid, "appearance_map")
        assert got_map.shape == want_map.shape == (FRAMES // 2, 7, 7, 8), vid
        np.testing.assert_allclose(got_map, want_map, rtol=2e-3, atol=2e-3, err_msg=vid)
        for key in ("map_frame_indices", "map_stride"):
            assert fs.video_attrs(vid)[key] == reference.video_attrs(vid)[key], (vid, key)
        times, want_times = fs.times(vid, "appearance"), reference.times(vid, "appearance")
        assert not times.derived  # measured by the decoder, as the local engine's
        np.testing.assert_array_equal(times.seconds, want_times.seconds)


def test_ray_engine_equals_local_and_records_bad_files(
    ray_cluster: Any,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    real_videos: list[Path],
    bad_inputs: dict[str, Path],
    local_reference: FeatureStore,
) -> None:
    # a missing path is a usage error before the run (tests/extractor/test_sources.py)
    bad_inputs = {kind: path for kind, path in bad_inputs.items() if kind != "missing"}
    store = tmp_path / "ray.zarr"
    summary = extract([*real_videos, *bad_inputs.values()], store, progress=True, videos_per_call=3)
    lines = capsys.readouterr().err.splitlines()
    n = len(real_videos) + len(bad_inputs)
    progress = [line for line in lines if line.startswith("extract: ")]
    assert progress[-1].startswith(f"extract: {n}/{n} videos"), lines  # one line for the cluster
    assert progress[-1].endswith(f"{len(bad_inputs)} failed") and "frames/s" in progress[-1]
    ids = local_reference.videos()
    assert summary.complete == ids
    assert summary.frames == FRAMES * len(ids)
    by_path = {s.path: s.video_id for s in make_sources([*real_videos, *bad_inputs.values()])}
    bad_ids = {kind: by_path[path] for kind, path in bad_inputs.items()}
    assert sorted(summary.failed) == sorted(bad_ids.values())
    fs = FeatureStore.open(store)
    for kind, vid in bad_ids.items():
        assert BAD_PROBLEMS[kind] in summary.failed[vid], (kind, summary.failed[vid])
        attrs = fs.video_attrs(vid)
        assert attrs["status"] == "failed"
        assert attrs["error"] == summary.failed[vid]
        assert str(bad_inputs[kind]) in attrs["error"]  # the reason names the file
    assert_same_features(store, local_reference, ids)
    assert_complete_once(store, ids)
    for vid in ids:  # labels and sources as the local engine records them
        want = local_reference.video_attrs(vid)
        got = fs.video_attrs(vid)
        for key in ("label", "source", "source_sha256", "n_frames", "fps", "width", "height"):
            assert got[key] == want[key], (vid, key)

    again = extract([*real_videos, *bad_inputs.values()], store)
    assert again.skipped == ids and not again.complete  # complete ones are never redone
    assert sorted(again.failed) == sorted(bad_ids.values())  # bad ones are retried, fail again


def _worker_pids(token: str, title: str) -> list[int]:
    """PIDs of this test's Ray worker processes (their environment holds ``token``) whose
    process title contains ``title``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if title in cmdline and f"FRAMEPOOL_TEST_RUN={token}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def _completed_groups(store: Path) -> int:
    n = 0
    for attrs in store.glob("videos/*/zarr.json"):
        try:
            n += json.loads(attrs.read_text()).get("attributes", {}).get("status") == "complete"
        except (OSError, ValueError):
            continue
    return n


def _run_while(
    run: Callable[[], ExtractionSummary], store: Path, act: Callable[[], bool]
) -> tuple[ExtractionSummary, bool]:
    """Run ``run`` in a thread; once a first video is complete, call ``act`` until it returns
    True (it did what it meant to) or the run ends. Returns the summary and whether it acted."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["summary"] = run()
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    acted = False
    while thread.is_alive() and not acted:
        if _completed_groups(store) >= 1:
            acted = act()
        time.sleep(0.2)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["summary"], acted


def test_killed_model_actor_leaves_every_video_complete_once(
    ray_cluster: Any, tmp_path: Path, real_videos: list[Path], local_reference: FeatureStore
) -> None:
    store = tmp_path / "killed.zarr"
    token = f"{os.getpid()}-{time.time_ns()}"
    killed: list[int] = []

    def kill_actor() -> bool:
        pids = _worker_pids(token, "EmbedVideos")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return bool(pids)

    summary, acted = _run_while(
        lambda: extract(
            real_videos,
            store,
            videos_per_call=1,
            runtime_env={"env_vars": {"FRAMEPOOL_TEST_RUN": token}},
        ),
        store,
        kill_actor,
    )
    assert acted, "the run ended before a model actor could be killed"
    ids = local_reference.videos()
    assert summary.ok and summary.complete == ids
    assert_complete_once(store, ids)
    assert_same_features(store, local_reference, ids)


@pytest.mark.slow  # a second node's start and its workers' take over a minute on 2 cores
def test_removed_node_leaves_every_video_complete_once(
    ray_cluster: Any, tmp_path: Path, real_videos: list[Path], local_reference: FeatureStore
) -> None:
    store = tmp_path / "node.zarr"
    node = ray_cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20)
    ray_cluster.wait_for_nodes()
    removed: list[bool] = []

    def remove_node() -> bool:
        ray_cluster.remove_node(node, allow_graceful=False)
        removed.append(True)
        return True

    try:
        # one model actor (one CPU) and three preparing tasks on the two nodes' four CPUs, so
        # some videos are prepared on the second node; when the actor was there, it restarts on
        # the head beside the preparing tasks
        summary, acted = _run_while(
            lambda: extract(real_videos, store, videos_per_call=1, prepare_tasks=3, model_actors=1),
            store,
            remove_node,
        )
    finally:
        if not removed:
            ray_cluster.remove_node(node)
    assert acted, "the run ended before the node could be removed"
    ids = local_reference.videos()
    assert summary.ok and summary.complete == ids
    assert_complete_once(store, ids)
    assert_same_features(store, local_reference, ids)


@pytest.mark.slow  # two drivers in subprocesses (torch, Ray's client) on top of the run
def test_killed_driver_rerun_redoes_exactly_the_unfinished(
    ray_cluster: Any, tmp_path: Path, real_videos: list[Path], local_reference: FeatureStore
) -> None:
    store = tmp_path / "driver.zarr"
    command = [
        sys.executable, "-m", "api.cli", "extract", *map(str, real_videos), "--store", str(store),
        "--weights", "random", "--arch", "resnet18", "--device", "cpu", "--max-frames",
        str(FRAMES), "--streams", "appearance,motion,appearance_map", "--map-dim", "8",
        "--map-stride", "2", "--engine", "ray", "--ray-address", ray_cluster.address,
        "--videos-per-call", "1", "--no-progress",
    ]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while driver.poll() is None and _completed_groups(store) < 1:
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[0].decode()
        driver.kill()  # SIGKILL: no clean-up of any kind
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    before = {v for v in FeatureStore.open(store).videos()}
    ids = local_reference.videos()
    assert 1 <= len(before) < len(ids)
    rerun = subprocess.run(command, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the summary line: what this run extracted and what was complete before it
    assert f"{len(ids) - len(before)} extracted" in rerun.stdout
    assert f"{len(before)} already complete" in rerun.stdout
    assert_complete_once(store, ids)
    assert_same_features(store, local_reference, ids)


def test_videos_and_store_on_s3(
    ray_cluster: Any,
    s3_server: S3Server,
    real_videos: list[Path],
    local_reference: FeatureStore,
) -> None:
    fs = s3_server.filesystem()
    fs.mkdir("clips")
    clips = real_videos[:3]
    for clip in clips:
        fs.put_file(str(clip), f"clips/walk/{clip.name}")
    fs.pipe_file("clips/walk/broken.mp4", b"not a video\n" * 20)
    listing = "\n".join(["# videos", *(f"walk/{c.name}" for c in clips), "walk/broken.mp4"])
    fs.pipe_file("clips/videos.txt", listing.encode())
    store = "s3://clips/features.zarr"

    summary = extract(["s3://clips/videos.txt"], store, runtime_env={"env_vars": s3_server.env})
    ids = sorted(c.stem for c in clips)
    assert summary.complete == ids, summary.failed
    assert list(summary.failed) == ["broken"]
    assert "'s3://clips/walk/broken.mp4'" in summary.failed["broken"]
    out = FeatureStore.open(store)
    assert out.videos() == ids
    assert out.labels(ids) == ["walk"] * len(ids)  # the folder holding each video
    names = {c.stem: c.name for c in clips}
    for vid in ids:
        assert out.video_attrs(vid)["source"] == f"s3://clips/walk/{names[vid]}"
        want = local_reference.video_attrs(vid)["source_sha256"]
        assert out.video_attrs(vid)["source_sha256"] == want
    assert_same_features(store, local_reference, ids)
    assert_complete_once(store, ids)


def test_cli_ray_engine_usage(tmp_path: Path, short_real_video: Path) -> None:
    store = str(tmp_path / "s.zarr")
    # ray options without the ray engine are a usage error, before anything runs
    assert main(["extract", str(short_real_video), "--store", store, "--model-actors", "2"]) == 2
    assert not Path(store).exists()
    with pytest.raises(ValueError, match="model_actors"):
        RayOptions(model_actors=0)


def test_missing_ray_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from extractor.ray_engine import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "framepool\[ray\]"'):
        import_ray()
