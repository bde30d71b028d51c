"""The ceiling of an extraction benchmark: the backbones alone on random input, frames per second.

Shared by ``extract.py`` (column (c)) and ``ray_compare.py`` (the model-alone figure of the engine
comparison); a module of its own so that neither script imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import _common  # noqa: F401  (the packages on sys.path)
import torch

from extractor.features import FeatureExtractor


def model_alone(fx: FeatureExtractor, streams: Sequence[str], n_batches: int) -> float:
    """Frames per second of the backbones alone (all of ``streams`` per frame)."""
    b = fx.batch_size
    dtype = torch.bfloat16 if fx.dtype == "bfloat16" else torch.float32
    inputs = {
        "appearance": torch.randn(b, 3, 224, 224).contiguous(memory_format=torch.channels_last),
        "motion": torch.randn(b, 20, 224, 224).contiguous(memory_format=torch.channels_last),
    }
    inputs = {k: v.to(fx.device, dtype) for k, v in inputs.items()}

    def step() -> None:
        with torch.inference_mode():
            for s in streams:
                fx.models[s](inputs[s]).float()

    step()  # warm-up
    sync(fx.device)
    start = time.perf_counter()
    for _ in range(n_batches):
        step()
    sync(fx.device)
    return n_batches * b / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
