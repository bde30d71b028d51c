"""A tiny real store and trained runs, built once per session for the end-to-end service tests.

Real clips are extracted with a random-weight resnet18 and DIS flow, 8 frames per video (the
extractor's own subsampling), then ``gap`` and ``tp`` heads are trained on them for a few epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import FeatureStore, safe_video_id
from tests.conftest import real_video_paths

STORE_FRAMES = 8
# real clips with made-up labels: enough to train a head and to index
TRAIN_CLIPS = {
    "mm_part_0.mp4": "people",
    "mm_test.avi": "people",
    "mm_demo_spatiotemporal_det.mp4": "people",
    "tu_v_Basketball_g01_c01.avi": "sport",
    "tu_abseiling_k400.mp4": "sport",
    "vf_v_GGSY1Qvo990.mp4": "sport",
}


@dataclass
class Served:
    store: Path
    gap: Path
    tp: Path
    clips: dict[str, Path]  # training clip video_id -> its file


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    from aggregator.train import train_run
    from extractor.features import FeatureExtractor

    root = tmp_path_factory.mktemp("served")
    extractor = FeatureExtractor(
        streams=("appearance", "motion"),
        flow="dis",
        weights="random",
        arch="resnet18",
        device="cpu",
    )
    store = FeatureStore.create(root / "store.zarr", extractor=extractor.config())
    paths = {p.name: p for p in real_video_paths()}
    clips: dict[str, Path] = {}
    for name, label in TRAIN_CLIPS.items():
        video = extractor.extract_file(paths[name], max_frames=STORE_FRAMES)
        vid = safe_video_id(Path(name).stem)
        store.write_video(
            vid,
            video.features,
            label=label,
            split="train",
            meta={"source": str(paths[name]), "n_frames": video.n_frames},
        )
        clips[vid] = paths[name]
    out = {}
    for head, kwargs in (("gap", {}), ("tp", {"depth": 3})):
        out[head] = root / f"run-{head}"
        train_run(
            root / "store.zarr",
            out[head],
            head=head,
            streams=("appearance", "motion"),
            head_kwargs=kwargs,
            test_split=None,
            val_fraction=0.0,
            epochs=5,
            device="cpu",
            make_plots=False,
        )
    return Served(store=root / "store.zarr", gap=out["gap"], tp=out["tp"], clips=clips)
