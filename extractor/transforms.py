"""Frame and flow transforms, exactly as framepool defines its two inputs.

Appearance input: the RGB frame's shorter side resized to 256 (aspect kept, bilinear, antialiased;
the longer side is ``int(256 * long / short)`` as torchvision computes it), centre crop 224x224,
ImageNet mean/std. The resize works on uint8 and returns uint8 (rounded), as torchvision's
``Resize`` does on uint8 images and PIL's bilinear resize does.

Motion input at frame t: the L = 10 flow fields starting at t, interleaved
``(dx_t, dy_t, dx_{t+1}, dy_{t+1}, ...)`` = 20 channels. Flow is computed on the grayscale frames at
the resized resolution, clipped to [-20, 20] pixels and mapped linearly to 0..255 with
``q = floor((clip(f) + 20) * 255 / 40 + 0.5)`` (round half up), so -20 -> 0, 20 -> 255 and zero
flow -> 128 (127.5 rounded up). Past the last field the last one is repeated, so every frame has a
stack; a one-frame video has a single zero field (all 128). Stacks are cropped like appearance and
normalised as ``(q / 255 - 0.5) / 0.226``; zero flow therefore reads as ``(128/255 - 0.5) / 0.226``
(about 0.0087), not exactly 0.

Layouts: frames and crops are NHWC uint8 (``[N, H, W, C]``, as decoded); the normalised model
inputs are NCHW float32 tensors in channels_last memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

RESIZE_SHORTER = 256
CROP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_BOUND = 20.0
STACK_LENGTH = 10
FLOW_MEAN = 0.5
FLOW_STD = 0.226
ZERO_FLOW_CODE = 128  # quantised value of a zero displacement
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class AppearanceInput:
    """The appearance stream's geometry and normalisation: resize the shorter side to
    ``resize_shorter`` (``interpolation``, antialiased, on uint8), centre crop ``crop_size``
    squared, then ``(x / 255 - mean) / std``. The default is framepool's ResNet input; a timm
    backbone brings its own (``timm.data.resolve_data_config``)."""

    resize_shorter: int = RESIZE_SHORTER
    crop_size: int = CROP_SIZE
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if not 1 <= self.crop_size <= self.resize_shorter:
            raise ValueError(
                f"crop size {self.crop_size} must be between 1 and the resized shorter side "
                f"{self.resize_shorter}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values, std > 0: {self.mean}, {self.std}")

    def config(self) -> dict[str, object]:
        """What a store records about this input (JSON-able)."""
        return {
            "input_size": self.crop_size,
            "resize_shorter": self.resize_shorter,
            "resize": f"{self.interpolation}, antialiased, on uint8",
            "crop": "center",
            "normalize_mean": list(self.mean),
            "normalize_std": list(self.std),
        }


DEFAULT_APPEARANCE_INPUT = AppearanceInput()


def resized_size(height: int, width: int, shorter: int = RESIZE_SHORTER) -> tuple[int, int]:
    """``(h, w)`` with the shorter side resized to ``shorter``, aspect kept (long side floored)."""
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def center_crop_box(height: int, width: int, size: int = CROP_SIZE) -> tuple[int, int]:
    """``(top, left)`` of the centred ``size`` x ``size`` crop (torchvision's rounding)."""
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {height}x{width} frame")
    return round((height - size) / 2.0), round((width - size) / 2.0)


def _as_nhwc_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(frames)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected frames [N, H, W, C], got shape {tuple(x.shape)}")
    return x


def resize_shorter(
    frames: np.ndarray | torch.Tensor,
    shorter: int = RESIZE_SHORTER,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Resize uint8 frames ``[N, H, W, C]`` (or one ``[H, W, C]``) to shorter side ``shorter``.

    Bilinear (or bicubic) with antialiasing, computed on uint8 and returned as uint8
    ``[N, h, w, C]``. Tensors on another device than the CPU go through
    :func:`resize_shorter_batch` (float32 there).
    """
    x = _as_nhwc_tensor(frames)
    if x.device.type != "cpu":
        return resize_shorter_batch(x, shorter, interpolation)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {x.dtype}")
    h, w = resized_size(int(x.shape[1]), int(x.shape[2]), shorter)
    if (h, w) == tuple(x.shape[1:3]):
        return x
    nchw = x.permute(0, 3, 1, 2)  # [N, C, H, W] view in channels_last memory
    out = F.interpolate(nchw, size=(h, w), mode=interpolation, antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1)  # [N, h, w, C]


def center_crop(x: np.ndarray | torch.Tensor, size: int = CROP_SIZE) -> np.ndarray | torch.Tensor:
    """Centre crop of NHWC ``[N, H, W, C]`` frames (or one ``[H, W, C]``), same type back."""
    hw_axis = 1 if x.ndim == 4 else 0
    top, left = center_crop_box(int(x.shape[hw_axis]), int(x.shape[hw_axis + 1]), size)
    if x.ndim == 4:
        return x[:, top : top + size, left : left + size]
    return x[top : top + size, left : left + size]


def normalize_appearance(
    crops: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 crops ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` (channels_last), normalised
    with ``mean``/``std`` (ImageNet's by default)."""
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected RGB crops [N, H, W, 3], got shape {tuple(crops.shape)}")
    # (q / 255 - mean) / std as one multiply and one subtract per value
    std64 = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std64)).float().view(1, 3, 1, 1).to(crops.device)
    shift = (torch.tensor(mean, dtype=torch.float64) / std64).float().view(1, 3, 1, 1)
    x = crops.permute(0, 3, 1, 2).float()  # [N, 3, H, W], channels_last memory
    return x.mul_(scale).sub_(shift.to(crops.device))


def appearance_transform(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Decoded uint8 RGB frames ``[N, H, W, 3]`` -> the float32 input ``[N, 3, 224, 224]``."""
    resized = resize_shorter(frames)
    crops = center_crop(resized)
    assert isinstance(crops, torch.Tensor)
    return normalize_appearance(crops)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """One uint8 RGB frame ``[H, W, 3]`` -> uint8 grayscale ``[H, W]`` (ITU-R BT.601 weights)."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def quantize_flow(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Flow in pixels -> uint8: clip to [-bound, bound], map linearly to 0..255, round half up."""
    f = np.clip(np.asarray(flow, dtype=np.float32), -bound, bound)
    q = np.floor((f + bound) * np.float32(255.0 / (2.0 * bound)) + np.float32(0.5))
    return np.clip(q, 0, 255).astype(np.uint8)


def dequantize_flow(q: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """uint8 flow codes -> pixels (the inverse map of :func:`quantize_flow`, up to rounding)."""
    return np.asarray(q, dtype=np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)


def zero_flow_field(height: int, width: int) -> np.ndarray:
    """The quantised zero flow field ``[H, W, 2]`` (all :data:`ZERO_FLOW_CODE`)."""
    return np.full((height, width, 2), ZERO_FLOW_CODE, dtype=np.uint8)


def stack_field_indices(t: int, n_fields: int, length: int = STACK_LENGTH) -> list[int]:
    """Indices of the flow fields in frame t's stack: ``t .. t+L-1``, the last one repeated."""
    if n_fields < 1:
        raise ValueError(f"need at least one flow field, got {n_fields}")
    if not 0 <= t < n_fields + 1:
        raise ValueError(f"frame {t} is outside a video with {n_fields} flow fields")
    return [min(t + j, n_fields - 1) for j in range(length)]


def motion_stacks(
    fields: np.ndarray, starts: np.ndarray | list[int], length: int = STACK_LENGTH
) -> np.ndarray:
    """Gather motion stacks ``[N, H, W, 2L]`` from quantised fields ``[F, H, W, 2]``.

    Stack n starts at field ``starts[n]``; channel ``2j + k`` is component k (0 = dx, 1 = dy) of
    field ``min(starts[n] + j, F - 1)``: interleaved, the last field repeated past the end.
    """
    if fields.ndim != 4 or fields.shape[-1] != 2:
        raise ValueError(f"expected flow fields [F, H, W, 2], got shape {fields.shape}")
    n_fields = fields.shape[0]
    idx = np.minimum(np.asarray(starts)[:, None] + np.arange(length)[None, :], n_fields - 1)
    g = fields[idx]  # [N, L, H, W, 2]
    n, _, h, w, _ = g.shape
    return np.ascontiguousarray(g.transpose(0, 2, 3, 1, 4)).reshape(n, h, w, 2 * length)


def normalize_motion(stacks: torch.Tensor) -> torch.Tensor:
    """uint8 stacks ``[N, H, W, 2L]`` -> float32 ``[N, 2L, H, W]`` (channels_last), normalised."""
    if stacks.ndim != 4:
        raise ValueError(f"expected motion stacks [N, H, W, 2L], got shape {tuple(stacks.shape)}")
    x = stacks.permute(0, 3, 1, 2).float()  # [N, 2L, H, W], channels_last memory
    return x.mul_(1.0 / (255.0 * FLOW_STD)).sub_(FLOW_MEAN / FLOW_STD)


# ---------------------------------------------------------------------------- device batches
# The same transforms on whole batches of torch tensors, on any device (a CUDA device: frames
# decoded by NVDEC never visit host memory). Kernels that exist only on the CPU for uint8 are
# replaced by float32 ones; each function states how far it may be from the CPU path above.

# OpenCV's 8-bit RGB2GRAY in fixed point: Y = (w . rgb + 2^14) >> 15
_GRAY_WEIGHTS = (9798, 19235, 3735)


def resize_shorter_batch(
    frames: torch.Tensor, shorter: int = RESIZE_SHORTER, interpolation: str = "bilinear"
) -> torch.Tensor:
    """:func:`resize_shorter` for uint8 ``[N, H, W, C]`` tensors on any device, uint8 back.

    Bilinear (or bicubic) with antialiasing in float32, rounded half to even and clamped. The CPU
    path's uint8 kernel uses fixed-point weights: bilinear results differ from it by at most 1
    level (on about 10% of values of the real clips); frames already at the size come back
    unchanged.
    """
    x = _as_nhwc_tensor(frames)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got {x.dtype}")
    h, w = resized_size(int(x.shape[1]), int(x.shape[2]), shorter)
    if (h, w) == tuple(x.shape[1:3]):
        return x
    nchw = x.permute(0, 3, 1, 2).float()  # [N, C, H, W]
    out = F.interpolate(nchw, size=(h, w), mode=interpolation, antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # [N, h, w, C]


def to_gray_batch(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[N, H, W, 3]`` -> uint8 grayscale ``[N, H, W]``, equal to :func:`to_gray`."""
    x = _as_nhwc_tensor(rgb)
    if x.dtype != torch.uint8 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    wr, wg, wb = _GRAY_WEIGHTS
    c = x.to(torch.int32)
    y = c[..., 0] * wr + c[..., 1] * wg + c[..., 2] * wb + (1 << 14)
    return (y >> 15).to(torch.uint8)


def appearance_batch(frames: torch.Tensor) -> torch.Tensor:
    """Decoded uint8 RGB ``[N, H, W, 3]`` on any device -> float32 ``[N, 3, 224, 224]``.

    :func:`appearance_transform` with the resize of :func:`resize_shorter_batch`: at most one
    level (1 / (255 * 0.224) after normalisation) from the CPU path, computed where the frames are.
    """
    crops = center_crop(resize_shorter_batch(frames))
    assert isinstance(crops, torch.Tensor)
    return normalize_appearance(crops)


def quantize_flow_batch(flow: torch.Tensor, bound: float = FLOW_BOUND) -> torch.Tensor:
    """:func:`quantize_flow` on a tensor on any device (float32 arithmetic, same formula)."""
    f = flow.float().clamp(-bound, bound)
    scale = torch.tensor(255.0 / (2.0 * bound), dtype=torch.float32, device=f.device)
    q = torch.floor((f + bound) * scale + 0.5)
    return q.clamp_(0, 255).to(torch.uint8)
