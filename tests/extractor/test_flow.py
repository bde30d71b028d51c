from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extractor.flow import RaftFlow, flow_from_config, make_flow


def _shifted_pair(h: int, w: int, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(h // 6 + 4, w // 6 + 4), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((w + 24, h + 24), Image.BICUBIC))
    prev = big[12 : 12 + h, 12 : 12 + w]
    nxt = big[12 - dy : 12 - dy + h, 12 - dx : 12 - dx + w]  # content moves by (+dx, +dy)
    return np.ascontiguousarray(prev), np.ascontiguousarray(nxt)


@pytest.mark.parametrize(
    ("name", "size"), [("dis", (96, 128)), ("farneback", (96, 128)), ("tvl1", (48, 64))]
)
def test_backend_recovers_a_translation(name: str, size: tuple[int, int]) -> None:
    prev, nxt = _shifted_pair(*size, dx=3, dy=-2)
    flow = make_flow(name)
    f = flow(prev, nxt)
    assert f.shape == (*size, 2) and f.dtype == np.float32
    inner = f[8:-8, 8:-8].reshape(-1, 2)
    np.testing.assert_allclose(np.median(inner, axis=0), [3.0, -2.0], atol=0.5)
    cfg = flow.config()
    assert cfg["backend"] == name
    json.dumps(cfg)
    rebuilt = flow_from_config(cfg)
    assert rebuilt.config() == cfg
    np.testing.assert_array_equal(rebuilt(prev, nxt), f)
    np.testing.assert_array_equal(flow.clone()(prev, nxt), f)


def test_dis_presets_and_unknown_names() -> None:
    assert make_flow("dis", preset="medium").config()["preset"] == "medium"
    with pytest.raises(ValueError, match="'slow'"):
        make_flow("dis", preset="slow")
    with pytest.raises(ValueError, match="'lk'"):
        make_flow("lk")
    with pytest.raises(ValueError, match="only used by --flow raft"):
        make_flow("dis", weights="x.pth")
    cfg = make_flow("dis").config()
    with pytest.raises(ValueError, match="different parameters"):
        flow_from_config({**cfg, "patch_size": 99})


def test_raft_needs_a_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--flow-weights PATH"):
        make_flow("raft")
    with pytest.raises(FileNotFoundError, match="nope\\.pth"):
        make_flow("raft", weights=tmp_path / "nope.pth", device="cpu")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a torchvision RAFT state dict"):
        make_flow("raft", weights=bad, device="cpu")


def _random_raft_small(path: Path) -> Path:
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    torch.save(raft_small(weights=None).state_dict(), path)
    return path


def test_raft_small_random_weights_on_cpu(tmp_path: Path) -> None:
    weights = _random_raft_small(tmp_path / "raft_small.pth")
    flow = make_flow("raft", weights=weights, device="cpu", num_flow_updates=2)
    prev, nxt = _shifted_pair(60, 70, dx=2, dy=1)
    f = flow(prev, nxt)
    assert f.shape == (60, 70, 2) and f.dtype == np.float32 and np.isfinite(f).all()
    cfg = flow.config()
    assert cfg["model"] == "raft_small" and cfg["num_flow_updates"] == 2
    np.testing.assert_array_equal(flow_from_config(cfg, device="cpu")(prev, nxt), f)
    torch.save({k: v + 1 for k, v in torch.load(weights).items()}, weights)
    with pytest.raises(ValueError, match="changed since extraction"):
        flow_from_config(cfg, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_raft_on_gpu(tmp_path: Path) -> None:
    weights = _random_raft_small(tmp_path / "raft_small.pth")
    prev, nxt = _shifted_pair(256, 320, dx=2, dy=1)
    cpu = RaftFlow(weights, device="cpu", num_flow_updates=4)(prev, nxt)
    gpu = RaftFlow(weights, device="cuda", num_flow_updates=4)(prev, nxt)
    np.testing.assert_allclose(gpu, cpu, atol=1e-2)
