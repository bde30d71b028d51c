"""Window backbones (``--arch hf:<model>``): tiny random-config VideoMAE and V-JEPA 2 models on the
real clips; window bounds and times at both ends; train, evaluate and serve on the result."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aggregator.run_loader import load_run
from aggregator.train import train_run
from api.cli import main
from api.service.maps import extractor_from_config
from extractor.decode import frame_times
from extractor.windows import WindowExtractor, window_bounds, window_times
from storage import FeatureStore
from tests.conftest import REPO, real_clip

transformers = pytest.importorskip("transformers")

CLIPS = (  # 32, 57, 164, 280 and 355 frames
    "mm_part_0.mp4",
    "mm_demo_spatiotemporal_det.mp4",
    "mm_test.avi",
    "mm_demo.mp4",
    "vf_v_GGSY1Qvo990.mp4",
)


def test_window_bounds_cover_every_frame() -> None:
    assert window_bounds(3, 8, 4).tolist() == [[0, 3]]  # shorter than one window
    assert window_bounds(8, 8, 4).tolist() == [[0, 8]]
    assert window_bounds(12, 8, 4).tolist() == [[0, 8], [4, 12]]
    # 11 is not a multiple of the stride: a last window ends at the last frame
    assert window_bounds(11, 4, 3).tolist() == [[0, 4], [3, 7], [6, 10], [7, 11]]
    for n in range(1, 40):
        for size, stride in ((4, 3), (5, 5), (8, 2), (16, 16)):
            b = window_bounds(n, size, stride)
            assert b[0, 0] == 0 and b[-1, 1] == n and (b[:, 1] - b[:, 0] == min(n, size)).all()
            assert (np.diff(b[:, 0]) <= stride).all() and (np.diff(b[:, 0]) > 0).all()
    times = np.array([0.0, 0.1, 0.25, 0.3, 0.5])
    centres, spans = window_times(times, np.array([[0, 3], [2, 5]]))
    np.testing.assert_allclose(spans, [[0.0, 0.25], [0.25, 0.5]])
    np.testing.assert_allclose(centres, [0.125, 0.375])


def tiny_models(root: Path) -> dict[str, Path]:
    """Config folders of a tiny VideoMAE (4 frames per window) and a tiny V-JEPA 2 (40 frames:
    longer than the 32-frame clip)."""
    videomae = transformers.VideoMAEConfig(
        num_frames=4, image_size=32, patch_size=16, tubelet_size=2, hidden_size=24,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
    )  # fmt: skip
    vjepa2 = transformers.VJEPA2Config(
        frames_per_clip=40, crop_size=32, patch_size=16, tubelet_size=2, hidden_size=24,
        num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=16,
        pred_num_hidden_layers=1, pred_num_attention_heads=2, pred_num_mask_tokens=2,
    )  # fmt: skip
    out = {}
    for name, config in (("videomae", videomae), ("vjepa2", vjepa2)):
        config.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def window_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, int]]:
    """Per model: its store (every clip, labelled and split), frames per window, stride."""
    d = tmp_path_factory.mktemp("windows")
    labels = d / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, name in enumerate(CLIPS):
            w.writerow([str(real_clip(name)), f"c{i % 2}", "test" if i == 2 else "train"])
    out = {}
    for name, folder in tiny_models(d).items():
        frames, stride = (4, 3) if name == "videomae" else (40, 16)
        store = d / f"{name}.zarr"
        args = ["extract", *(str(real_clip(n)) for n in CLIPS), "--labels", str(labels)]
        args += ["--store", str(store)]
        args += ["--arch", f"hf:{folder}", "--weights", "random", "--window-stride", str(stride)]
        args += ["--device", "cpu", "--no-progress"]
        assert main(args) == 0
        out[name] = (store, frames, stride)
    return out


@pytest.mark.parametrize("model", ["videomae", "vjepa2"])
def test_window_rows_and_times_on_real_clips(
    window_stores: dict[str, tuple[Path, int, int]], model: str
) -> None:
    path, frames, stride = window_stores[model]
    store = FeatureStore.open(path)
    cfg = store.extractor["appearance"]
    assert cfg["rows"] == "windows" and cfg["window_frames"] == frames
    assert cfg["weights"] == "random" and len(cfg["state_sha256"]) == 64
    for name in CLIPS:
        vid = Path(name).stem
        decoded = frame_times(real_clip(name)).seconds
        bounds = window_bounds(len(decoded), frames, stride)
        x = store.read(vid, "appearance")
        assert x.shape == (len(bounds), 24) and np.isfinite(x).all()
        t = store.times(vid, "appearance")
        assert not t.derived and t.spans is not None
        # both ends: the first window starts at the first frame, the last ends at the last
        assert t.spans[0, 0] == pytest.approx(decoded[0]) and t.spans[-1, 1] == pytest.approx(
            decoded[-1]
        )
        np.testing.assert_allclose(t.spans, decoded[bounds - [0, 1]], atol=1e-9)
        np.testing.assert_allclose(t.seconds, t.spans.mean(axis=1), atol=1e-9)
    if model == "vjepa2":  # the 32-frame clip is shorter than one 40-frame window
        assert store.n_frames("mm_part_0", "appearance") == 1
    else:  # 32 frames, windows of 4 every 3: starts 0 .. 27, then one at 28 ending at frame 31
        assert store.n_frames("mm_part_0", "appearance") == 11


def test_train_evaluate_and_serve_on_window_features(
    window_stores: dict[str, tuple[Path, int, int]], tmp_path: Path
) -> None:
    path, _, _ = window_stores["videomae"]
    run = tmp_path / "run"
    metrics = train_run(
        path, run, head="attn", head_kwargs={"segments": 4, "dim": 8, "heads": 2},
        steps=20, lr=1e-3, weight_decay=1e-4, device="cpu", threads=1, probe=False,
        make_plots=False,
    )  # fmt: skip
    assert metrics["n_test"] == 1 and metrics["n_train"] == 4
    assert main(["evaluate", "--run", str(run), "--store", str(path)]) == 0
    store = FeatureStore.open(path)
    extractor = extractor_from_config(store.extractor, device="cpu")  # what serve builds
    assert isinstance(extractor, WindowExtractor)
    video = extractor.extract_file(real_clip("mm_test.avi"))
    stored = store.read("mm_test", "appearance")
    np.testing.assert_allclose(video.features["appearance"], stored, rtol=1e-2, atol=1e-2)
    assert video.frame_times is not None
    np.testing.assert_allclose(video.frame_times, store.times("mm_test", "appearance").seconds)
    predictor = load_run(run)
    p = predictor.predict_proba({"appearance": video.features["appearance"]})
    assert p.shape == (2,) and abs(float(p.sum()) - 1) < 1e-5
    saved = json.loads((run / "evaluation-test.json").read_text())
    assert saved["n_test"] == 1


def test_random_weights_are_reproducible_and_hashed(tmp_path: Path) -> None:
    folder = tiny_models(tmp_path)["videomae"]
    a = WindowExtractor(f"hf:{folder}", "random", device="cpu")
    b = WindowExtractor(f"hf:{folder}", "random", device="cpu", seed=1)
    assert a.record["state_sha256"] != b.record["state_sha256"]
    again = WindowExtractor.from_config(a.config(), device="cpu")
    assert again.record == a.record
    weights = tmp_path / "w.pt"
    torch.save(a.model.state_dict(), weights)
    c = WindowExtractor(f"hf:{folder}", weights, device="cpu")
    assert c.record["state_sha256"] == a.record["state_sha256"]
    assert len(c.record["weights_sha256"]) == 64


def test_offline_pretrained_weights_are_an_error_naming_the_file(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "api.cli", "extract", str(real_clip("mm_part_0.mp4"))]
    args += ["--store", str(tmp_path / "s.zarr"), "--arch", "hf:facebook/vjepa2-vitl-fpc64-256"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "models--facebook--vjepa2-vitl-fpc64-256" in done.stderr
    assert "model.safetensors" in done.stderr and "--weights PATH" in done.stderr


def test_a_bad_video_fails_alone(tmp_path: Path) -> None:
    folder = tiny_models(tmp_path)["videomae"]
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    store = tmp_path / "s.zarr"
    args = ["extract", str(bad), str(real_clip("mm_part_0.mp4")), "--store", str(store)]
    args += ["--arch", f"hf:{folder}", "--weights", "random", "--device", "cpu", "--no-progress"]
    assert main(args) == 1
    s = FeatureStore.open(store)
    assert s.videos() == ["mm_part_0"] and s.status("notes") == "failed"
    assert "notes.mp4" in s.video_attrs("notes")["error"]
    assert main([*args[:5], "--arch", f"hf:{folder}", "--streams", "motion"]) == 2
