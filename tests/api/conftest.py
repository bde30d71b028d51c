"""A tiny real store and trained runs, built once per session for the end-to-end service tests.

Real clips (with made-up labels) and generated demo clips are extracted by ``framepool extract``
with a random-weight resnet18 and DIS flow, 8 frames per video, then ``framepool train`` fits
``gap`` and ``tp`` heads on them for a few epochs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.cli import main as cli_main
from storage import FeatureStore
from tests.conftest import real_video_paths

STORE_FRAMES = 8
REAL_CLIPS = {
    "mm_part_0.mp4": "people",
    "mm_demo_spatiotemporal_det.mp4": "people",
    "mm_demo_skeleton.mp4": "people",
    "mm_test.avi": "sport",
    "mm_S001C001P001R001A001_rgb.avi": "sport",
    "vf_v_GGSY1Qvo990.mp4": "sport",
}
CLASSES = ["left_then_right", "people", "right_then_left", "sport"]


def labelled_clips(
    root: Path, real: dict[str, str], *, n_per_class: int, n_frames: int, test_suffix: str
) -> tuple[Path, list[tuple[Path, str, str]]]:
    """The real clips named in ``real`` (file name -> label, all in the train split) and
    generated demo clips (96 x 96; those whose stem ends with ``test_suffix`` in the test split)
    listed in ``root/labels.csv``; returns that file and its rows (path, label, split)."""
    from extractor.synthetic import make_demo_clips

    paths = {p.name: p for p in real_video_paths()}
    rows = [(paths[name], label, "train") for name, label in real.items()]
    demo = make_demo_clips(root / "demo", n_per_class=n_per_class, n_frames=n_frames, size=(96, 96))
    rows += [(p, label, "test" if p.stem.endswith(test_suffix) else "train") for p, label in demo]
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows((str(p), label, split) for p, label, split in rows)
    return labels, rows


@dataclass
class Served:
    store: Path
    gap: Path
    tp: Path
    clips: dict[str, Path]  # video_id -> its file, every video in the store
    train: list[str]  # video ids of the train split


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp("served")
    labels, rows = labelled_clips(root, REAL_CLIPS, n_per_class=3, n_frames=16, test_suffix="2")
    store = root / "store.zarr"
    extract = ["extract", *(str(p) for p, _, _ in rows), "--store", str(store)]
    extract += ["--labels", str(labels), "--arch", "resnet18", "--weights", "random"]
    extract += ["--flow", "dis", "--max-frames", str(STORE_FRAMES), "--device", "cpu"]
    assert cli_main([*extract, "--no-progress"]) == 0
    runs = {}
    for head, extra in (("gap", []), ("tp", ["--levels", "3"])):
        runs[head] = root / f"run-{head}"
        train = ["train", "--store", str(store), "--head", head, "--out", str(runs[head])]
        train += ["--epochs", "5", "--val-fraction", "0", "--device", "cpu", "--no-plots"]
        assert cli_main([*train, *extra]) == 0
    fs = FeatureStore.open(store)
    clips = {vid: Path(fs.video_attrs(vid)["source"]) for vid in fs.videos()}
    assert len(clips) == len(rows)
    return Served(store, runs["gap"], runs["tp"], clips, fs.videos(split="train"))
