from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from extractor.transforms import (
    ZERO_FLOW_CODE,
    appearance_transform,
    center_crop_box,
    dequantize_flow,
    motion_stacks,
    normalize_motion,
    quantize_flow,
    resize_shorter,
    resized_size,
    stack_field_indices,
    zero_flow_field,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, size=(n, h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in smooth])
    noise = rng.integers(-20, 21, size=big.shape)
    return np.clip(big.astype(int) + noise, 0, 255).astype(np.uint8)


def _pil_reference(frame: np.ndarray) -> np.ndarray:
    """Shorter side 256 with PIL bilinear (antialiased), centre crop 224, ImageNet mean/std."""
    h, w = frame.shape[:2]
    nh, nw = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    img = np.asarray(Image.fromarray(frame).resize((nw, nh), Image.BILINEAR)).astype(np.float64)
    top, left = round((nh - 224) / 2), round((nw - 224) / 2)
    crop = img[top : top + 224, left : left + 224] / 255.0
    return ((crop - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize(("h", "w"), [(300, 400), (120, 160), (480, 270), (256, 340)])
def test_appearance_matches_pil_reference(h: int, w: int) -> None:
    frames = _frames(2, h, w)
    out = appearance_transform(frames)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    for i in range(2):
        ref = _pil_reference(frames[i])
        diff = np.abs(out[i].numpy() - ref)
        # PIL and torch round their uint8 resize independently: at most one grey level apart
        assert diff.max() <= 1.0 / 255 / 0.224 + 1e-5
        assert diff.mean() < 0.002


def test_resize_and_crop_equal_torchvision() -> None:
    frames = _frames(3, 360, 480, seed=1)
    ours = resize_shorter(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    tv = TF.resize(x, [256], antialias=True)
    assert torch.equal(ours.permute(0, 3, 1, 2), tv)
    assert tuple(ours.shape) == (3, 256, 341, 3)
    out = appearance_transform(frames)
    tv_crop = TF.center_crop(tv, [224]).float() / 255
    ref = TF.normalize(tv_crop, list(MEAN), list(STD))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_sizes() -> None:
    assert resized_size(240, 320) == (256, 341)
    assert resized_size(1080, 1920) == (256, 455)
    assert resized_size(480, 270) == (455, 256)
    assert resized_size(256, 256) == (256, 256)
    assert center_crop_box(256, 341) == (16, 58)
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop_box(200, 300)


def test_flow_quantisation_points() -> None:
    f = np.array([-100.0, -20.0, -10.0, 0.0, 10.0, 20.0, 35.0], dtype=np.float32)
    q = quantize_flow(f)
    # (f + 20) * 255 / 40, rounded half up, clipped to [-20, 20] first
    assert q.tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert q.dtype == np.uint8
    assert ZERO_FLOW_CODE == 128
    assert np.all(zero_flow_field(3, 4) == 128)
    # round trip within half a step (40 / 255 / 2 pixels)
    g = np.linspace(-20, 20, 1001, dtype=np.float32)
    assert np.abs(dequantize_flow(quantize_flow(g)) - g).max() <= 20 / 255 + 1e-5
    assert np.all(np.diff(quantize_flow(g).astype(int)) >= 0)


def test_flow_quantisation_matches_naive_loop() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(0, 15, size=(5, 7, 2)).astype(np.float32)
    q = quantize_flow(f)
    for v, code in zip(f.ravel(), q.ravel(), strict=True):
        c = min(max(float(v), -20.0), 20.0)
        expected = int(np.floor((c + 20.0) / 40.0 * 255.0 + 0.5))
        assert code == min(expected, 255)


def _naive_stack(fields: np.ndarray, t: int, length: int = 10) -> np.ndarray:
    """[2L, H, W]: for j in 0..L-1, channels dx, dy of field t+j (last field repeated)."""
    chans = []
    for j in range(length):
        i = t + j if t + j < len(fields) else len(fields) - 1
        chans.append(fields[i, :, :, 0])
        chans.append(fields[i, :, :, 1])
    return np.stack(chans)


@pytest.mark.parametrize("n_fields", [1, 3, 12, 25])
def test_motion_stacks_interleave_and_pad(n_fields: int) -> None:
    rng = np.random.default_rng(n_fields)
    fields = rng.integers(0, 256, size=(n_fields, 5, 6, 2), dtype=np.uint8)
    starts = list(range(n_fields + 1)) if n_fields > 1 else [0]  # T = n_fields + 1 frames
    got = motion_stacks(fields, starts)
    assert got.shape == (len(starts), 5, 6, 20)
    for n, t in enumerate(starts):
        np.testing.assert_array_equal(got[n].transpose(2, 0, 1), _naive_stack(fields, t))
        assert stack_field_indices(t, n_fields) == [min(t + j, n_fields - 1) for j in range(10)]


def test_motion_normalisation_and_zero_flow() -> None:
    stacks = np.full((1, 4, 4, 20), ZERO_FLOW_CODE, np.uint8)
    stacks[0, 0, 0, 0] = 0
    stacks[0, 0, 0, 1] = 255
    x = normalize_motion(torch.from_numpy(stacks))
    assert x.shape == (1, 20, 4, 4)
    assert x[0, 0, 0, 0].item() == pytest.approx((0 - 0.5) / 0.226)
    assert x[0, 1, 0, 0].item() == pytest.approx((1 - 0.5) / 0.226)
    assert x[0, 5, 2, 2].item() == pytest.approx((128 / 255 - 0.5) / 0.226, abs=1e-6)
