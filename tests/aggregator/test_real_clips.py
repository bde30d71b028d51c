"""Real clips through the trainer: real lengths, the node cache, training, evaluation, reloading.

Per-frame features here are cheap stand-ins for the backbone (8x8 grayscale thumbnails, and
their frame differences as "motion"), so that the real videos' frame counts and content go
through every step in seconds. Each clip is stored forwards and reversed, as two classes that
differ only in temporal order.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from aggregator.data import load_summaries
from aggregator.intervals import Intervals, node_means
from aggregator.run_loader import TorchRun, load_run
from api.cli import main
from storage import FeatureStore, safe_video_id
from tests.aggregator.reference import one_thread  # noqa: F401 - autouse fixture
from tests.conftest import real_video_paths


def thumbnails(path: Path) -> np.ndarray:
    """``[T, 64]`` 8x8 grayscale thumbnails of every decoded frame, in [0, 1]."""
    with av.open(str(path)) as container:
        frames = [
            f.reformat(width=8, height=8, format="gray").to_ndarray().reshape(-1)
            for f in container.decode(video=0)
        ]
    return np.stack(frames).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("real") / "store.zarr"
    store = FeatureStore.create(path, extractor={"appearance": {"backbone": "thumbnail-8x8"}})
    clips = real_video_paths()
    assert len(clips) >= 6
    for i, clip in enumerate(clips):
        x = thumbnails(clip)
        split = "test" if i % 3 == 0 else "train"
        for label, seq in (("forward", x), ("reversed", x[::-1])):
            motion = np.abs(np.diff(seq, axis=0, append=seq[-1:]))
            store.write_video(
                safe_video_id(f"{clip.stem}_{label}"),
                {"appearance": seq, "motion": motion},
                label=label,
                split=split,
                meta={"source": str(clip), "n_frames": len(seq)},
            )
    return str(path)


def test_node_cache_on_real_lengths(real_store: str) -> None:
    store = FeatureStore.open(real_store, "r+")
    ids = store.videos()
    lengths = {store.n_frames(v, "appearance") for v in ids}
    assert min(lengths) == 32 and len(lengths) >= 6  # the real clips' own frame counts
    nodes = load_summaries(store, ids, "appearance", Intervals.pyramid(6), progress=False)
    for i, vid in enumerate(ids):
        want = node_means(store.read(vid, "appearance"), 6).astype(np.float16)
        np.testing.assert_array_equal(nodes[i], want)


def test_train_evaluate_reload_on_real_clips(real_store: str, tmp_path: Path) -> None:
    runs = {}
    for head, extra in (("tp", ["--levels", "4"]), ("gap", [])):
        out = tmp_path / head
        argv = ["train", "--store", real_store, "--head", head, "--out", str(out), *extra]
        argv += ["--epochs", "15", "--batch-size", "4", "--threads", "1", "--device", "cpu"]
        assert main(argv) == 0
        runs[head] = json.loads((out / "metrics.json").read_text())
        assert main(["evaluate", "--run", str(out), "--store", real_store]) == 0
        ev = json.loads((out / "evaluation-test.json").read_text())
        assert ev["confusion_matrix"] == runs[head]["confusion_matrix"]

    # mean pooling cannot tell a clip from its reversal: identical logits, so exactly one of
    # each pair is right whatever the weights
    assert runs["gap"]["top1"] == 0.5
    store = FeatureStore.open(real_store)
    tp = load_run(tmp_path / "tp")
    gap = load_run(tmp_path / "gap")
    assert isinstance(tp, TorchRun) and isinstance(gap, TorchRun)
    confusion = np.zeros((2, 2), dtype=int)
    for vid in store.videos(split="test"):
        feats = {s: store.read(vid, s) for s in ("appearance", "motion")}
        p = tp.predict_proba(feats)
        confusion[tp.class_names.index(store.video_attrs(vid)["label"]), p.argmax()] += 1
        if vid.endswith("_forward"):
            twin = vid[: -len("forward")] + "reversed"
            rev = {s: store.read(twin, s) for s in ("appearance", "motion")}
            np.testing.assert_allclose(gap.embed(feats), gap.embed(rev), rtol=1e-4, atol=1e-5)
            assert not np.allclose(tp.embed(feats), tp.embed(rev), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(confusion, runs["tp"]["confusion_matrix"])
