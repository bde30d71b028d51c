"""The device-batch transforms equal the per-frame CPU ones (within their stated tolerance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from extractor.decode import iter_frames
from extractor.transforms import (
    FLOW_BOUND,
    IMAGENET_STD,
    appearance_batch,
    appearance_transform,
    quantize_flow,
    quantize_flow_batch,
    resize_shorter,
    resize_shorter_batch,
    to_gray,
    to_gray_batch,
)

# one level of the uint8 resize, after normalisation by the smallest ImageNet std
ONE_LEVEL = 1.0 / (255.0 * min(IMAGENET_STD)) + 1e-5


def _real_frames(real_videos: list[Path], name: str, n: int = 6) -> np.ndarray:
    path = next(p for p in real_videos if p.name == name)
    return np.stack([f for _, f in zip(range(n), iter_frames(path), strict=False)])


@pytest.mark.parametrize(
    "name",
    ["mm_test.avi", "vf_v_GGSY1Qvo990.mp4", "mm_demo_skeleton.mp4", "mm_demo.mp4"],
)
def test_batch_resize_and_appearance_within_one_level(real_videos: list[Path], name: str) -> None:
    frames = _real_frames(real_videos, name)
    ref = resize_shorter(frames)
    got = resize_shorter_batch(torch.from_numpy(frames))
    assert got.shape == ref.shape and got.dtype == torch.uint8
    diff = (got.int() - ref.int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 0.25  # measured: 0 to 16% of values differ
    app = appearance_batch(torch.from_numpy(frames))
    ref_app = appearance_transform(frames)
    assert app.shape == ref_app.shape == (len(frames), 3, 224, 224)
    assert app.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(app, ref_app, atol=ONE_LEVEL, rtol=0)


def test_frames_at_the_size_are_unchanged() -> None:
    x = torch.randint(0, 256, (2, 256, 300, 3), dtype=torch.uint8)
    assert resize_shorter_batch(x) is x


def test_gray_equals_opencv_for_every_rgb_value() -> None:
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    np.testing.assert_array_equal(to_gray_batch(torch.from_numpy(rgb))[0].numpy(), to_gray(rgb))


def test_flow_quantisation_equal_including_rounding_edges() -> None:
    rng = np.random.default_rng(0)
    # every code's rounding edge, the floats either side of it, and the clipping range
    edges = ((np.arange(257) - 0.5) * (2 * FLOW_BOUND / 255) - FLOW_BOUND).astype(np.float32)
    flow = np.concatenate(
        [
            (rng.standard_normal(5000) * 15).astype(np.float32),
            edges,
            np.nextafter(edges, np.float32(np.inf)),
            np.nextafter(edges, np.float32(-np.inf)),
            np.array([-1e6, -20.0, 0.0, 20.0, 1e6], dtype=np.float32),
        ]
    ).reshape(-1, 2)
    got = quantize_flow_batch(torch.from_numpy(flow))
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), quantize_flow(flow))


def test_bad_batches_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_shorter_batch(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        to_gray_batch(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_equal_to_cpu_batch_path(real_videos: list[Path]) -> None:
    frames = torch.from_numpy(_real_frames(real_videos, "vf_v_GGSY1Qvo990.mp4"))
    gpu = resize_shorter(frames.cuda())  # dispatches to the float path on a CUDA device
    assert gpu.device.type == "cuda"
    diff = (gpu.cpu().int() - resize_shorter_batch(frames).int()).abs()
    assert int(diff.max()) <= 1
    torch.testing.assert_close(
        appearance_batch(frames.cuda()).cpu(), appearance_batch(frames), atol=ONE_LEVEL, rtol=0
    )
    np.testing.assert_array_equal(
        to_gray_batch(frames.cuda()).cpu().numpy(), to_gray_batch(frames).numpy()
    )
